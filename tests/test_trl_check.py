"""The TRL adapter's check of the installed TRL: the version and the private GRPOTrainer hooks it overrides or
calls, at import (`check_trl`) and when a trainer is built (`_check_attributes`)."""
import dataclasses
import os
import subprocess
import sys
import types

import pytest

trl = pytest.importorskip("trl")

from appo_kernels.integrations.trl import TESTED_TRL, _check_attributes, check_trl  # noqa: E402

TESTED = r"tested with trl>=1\.16,<1\.17 \(releases 1\.16\.0\)"


def _check_fails(match):
    with pytest.raises(ImportError, match=TESTED) as err:
        check_trl(trl)
    assert err.match(match)
    return str(err.value)


def test_an_untested_version_fails_naming_the_tested_releases(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    message = _check_fails(r"version 1\.17\.0 is outside >=1\.16,<1\.17")
    assert 'pip install "trl>=1.16,<1.17"' in message and 'pip install ".[trl]"' in message
    monkeypatch.setattr(trl, "__version__", "1.16.3")          # a patch release of the tested minor passes
    check_trl(trl)


@pytest.mark.parametrize("hook", ["_calculate_rewards", "_generate_and_score_completions", "_compute_loss",
                                  "_tool_call_loop", "_tokenize_prompts", "_generate_single_turn",
                                  "_get_per_token_logps_and_entropies", "_get_tool_suffix_ids"])
def test_a_missing_hook_fails(monkeypatch, hook):
    monkeypatch.delattr(trl.GRPOTrainer, hook)
    _check_fails(rf"GRPOTrainer\.{hook} is missing")


def test_an_overridden_hook_must_keep_its_exact_parameters(monkeypatch):
    # TRL calls the adapter's override: an extra parameter, even optional, may be passed and would be lost.
    monkeypatch.setattr(trl.GRPOTrainer, "_compute_loss", lambda self, model, inputs, scale=1.0: None)
    _check_fails(r"GRPOTrainer\._compute_loss\(self, model, inputs, scale\) is not \(self, model, inputs\)")
    monkeypatch.setattr(trl.GRPOTrainer, "_compute_loss", lambda self, model, batch: None)
    _check_fails(r"_compute_loss\(self, model, batch\)")


def test_a_called_hook_must_keep_its_leading_parameters(monkeypatch):
    def renamed(self, model, ids, attention_mask, logits_to_keep, batch_size=None):
        pass

    def new_required(self, prompt_ids, images, multimodal_fields, num_generations, sampling_params):
        pass

    def new_optional(self, prompt_ids, images, multimodal_fields, num_generations, sampling_params=None, **kw):
        pass

    monkeypatch.setattr(trl.GRPOTrainer, "_get_per_token_logps_and_entropies", renamed)
    _check_fails(r"_get_per_token_logps_and_entropies\(self, model, ids, attention_mask, logits_to_keep, "
                 r"batch_size\) is not \(self, model, input_ids, attention_mask, logits_to_keep, <optional \.\.\.>\)")
    monkeypatch.undo()
    monkeypatch.setattr(trl.GRPOTrainer, "_generate_single_turn", new_required)
    _check_fails(r"_generate_single_turn\(self, prompt_ids, images, multimodal_fields, num_generations, "
                 r"sampling_params\) is not")
    monkeypatch.setattr(trl.GRPOTrainer, "_generate_single_turn", new_optional)   # still called the same way
    check_trl(trl)
    import trl.chat_template_utils as templates
    monkeypatch.setattr(templates, "parse_response", lambda tokenizer, ids, tools=None: None)
    _check_fails(r"chat_template_utils\.parse_response\(tokenizer, ids, tools\) is not \(tokenizer, ids, prefix, tools")


def test_a_missing_init_keyword_or_config_field_fails(monkeypatch):
    def init(self, model, reward_funcs=None, args=None, rollout_func=None, environment_factory=None):
        pass

    monkeypatch.setattr(trl.GRPOTrainer, "__init__", init)
    _check_fails(r"GRPOTrainer\.__init__ has no `tools` parameter")
    monkeypatch.undo()
    config = dataclasses.make_dataclass("GRPOConfig", [f.name for f in dataclasses.fields(trl.GRPOConfig)
                                                       if f.name != "use_adaptive_entropy"])
    monkeypatch.setattr(trl, "GRPOConfig", config)
    _check_fails(r"GRPOConfig has no field `use_adaptive_entropy`")


def test_every_problem_is_named_in_one_message(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "2.0.0")
    monkeypatch.delattr(trl.GRPOTrainer, "_tokenize_prompts")
    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", lambda self, inputs, mode: None)
    message = _check_fails("version 2.0.0")
    assert "_tokenize_prompts is missing" in message
    assert "_generate_and_score_completions(self, inputs, mode)" in message


def test_trainer_attributes_are_checked_on_construction():
    complete = dict(_metrics={"train": {}, "eval": {}}, _logs={"advantages": []}, _tokenizer=None, tools=None,
                    environment_factories=None, eos_token_ids=[1], ref_model=None, reward_weights=None,
                    num_generations_eval=4, max_tool_calling_iterations=2)
    _check_attributes(types.SimpleNamespace(**complete))
    missing = {k: v for k, v in complete.items() if k != "_tokenizer"}
    with pytest.raises(RuntimeError, match=TESTED + r".*GRPOTrainer\.__init__ sets no `_tokenizer`"):
        _check_attributes(types.SimpleNamespace(**missing))
    with pytest.raises(RuntimeError, match=r"_logs no 'advantages'"):
        _check_attributes(types.SimpleNamespace(**(complete | {"_logs": {"prompt": []}})))
    # with environment_factory, also the environments and their tools
    with pytest.raises(RuntimeError, match=r"sets no `_env_tools` with environment_factory"):
        _check_attributes(types.SimpleNamespace(**(complete | {"environment_factories": {None: object},
                                                               "environments": None})))
    _check_attributes(types.SimpleNamespace(**(complete | {"environment_factories": {None: object},
                                                           "environments": None, "_env_tools": {}})))


def _import_adapter(setup: str) -> subprocess.CompletedProcess:
    code = f"{setup}\nimport appo_kernels.integrations.trl"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_importing_the_adapter_runs_the_check():
    run = _import_adapter("import trl; trl.__version__ = '1.15.0'")
    assert run.returncode != 0
    assert "ImportError: appo_kernels.integrations.trl is tested with trl" + TESTED_TRL in run.stderr
    assert "version 1.15.0 is outside" in run.stderr


def test_without_trl_the_error_points_at_the_install_from_a_clone():
    run = _import_adapter("import sys; sys.modules['trl'] = None")
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: trl is needed for appo_kernels.integrations.trl and is not installed")
    assert 'in a clone of the appo_kernels repository, pip install ".[trl]"' in last
    assert "appo-kernels[trl]" not in run.stderr
