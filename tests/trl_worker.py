"""Worker for tests/test_trl.py's two-process run (launched by torchrun; not a test module): trains APPOTrainer
for two rounds and writes, per rank and round, its rows' tree, completions, advantages and loss-token count."""
import json
import sys

from datasets import Dataset

from appo_kernels.integrations.trl import APPOConfig, APPOTrainer

PROMPTS = ["a+b=", "c+d=", "e+f=", "g+h=", "i+j=", "a+c=", "b+d=", "e+g="]


def a_fraction(completions, **_):
    return [c.count("a") / max(len(c), 1) for c in completions]


class Recorder(APPOTrainer):
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        record = {"prompts": [x["prompt"] for x in inputs], "ids": out["completion_ids"].tolist(),
                  "mask": out["completion_mask"].tolist(), "advantages": out["advantages"].tolist(),
                  "loss_mask": out["tool_mask"].tolist(), "items": int(out["num_items_in_batch"]),
                  **{key: [x[key] for x in inputs] for key in ("appo_parent", "appo_split", "appo_branch_score")}}
        with open(f"{sys.argv[2]}/rank{self.accelerator.process_index}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return out


if __name__ == "__main__":
    args = APPOConfig(output_dir=f"{sys.argv[2]}/out", per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=12, max_steps=2, report_to="none", use_cpu=True, seed=0,
                      save_strategy="no", learning_rate=1e-2, disable_tqdm=True, beta=0.0)
    Recorder(model=sys.argv[1], reward_funcs=a_fraction, args=args,
             train_dataset=Dataset.from_dict({"prompt": PROMPTS})).train()
