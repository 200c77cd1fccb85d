"""appo_train: the reference trainer of appo_kernels — APPO end to end on a CPU, against GRPO and ARPO.

A char-level tokenizer and a tiny transformers policy (no downloads), multi-turn tool tasks with verifiable
rewards, a supervised warm start, then RL in one loop where every APPO computation goes through
appo_kernels. Run `appo-train --help`; the modules, one concern each:

    tokenizer   the char-level tokenizer         tasks       tools, tasks, rewards, demonstrations
    policy      model + KV-cache generation      algorithms  rollouts and advantages per algorithm
    trainer     warm start, RL loop, checkpoints report      plots and the HTML report
    cli         the `appo-train` command
    hf_policy   `--model`: a Hugging Face causal LM and its chat template behind the tokenizer's tool protocol
    chat_tasks  `--model`'s task: word problems with a calculator and a lookup, and their reward
"""
from .trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
