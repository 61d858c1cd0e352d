"""fourbit.recipes: the shipped Guanaco recipes hold the paper's numbers and resolve by name.

The expected numbers are written out here from the paper, not read from the YAML: Dettmers et al.
2023, "QLoRA: Efficient Finetuning of Quantized LLMs", Appendix B.2 and Table 9 (OASST1 rows), and
its launch scripts (github.com/artidoro/qlora, scripts/finetune_guanaco_{7b,13b,33b,65b}.sh).
Nothing is downloaded: the recipes are parsed, not run.
"""

import pytest

from fourbit.commands import train as train_cmd
from fourbit.commands.flags import parse_cli
from fourbit.errors import UserError
from fourbit.recipes import describe, recipes
from fourbit.train import TrainConfig, apply_demo_preset

# Shared by every Guanaco run: NF4 + double quantization with bf16 compute (§3, §5), LoRA r=64
# alpha=16 on all linear layers (§4, B.2), paged AdamW (§3) with beta2 0.999 and no weight decay,
# max grad norm 0.3, batch 16 (Table 9) as 1 x 16, 1,875 steps (Table 9), constant schedule, group
# by length, gradient checkpointing, target length 512 and source 16 (Table 9 / the scripts), seed 0.
PAPER = dict(data="timdettmers/openassistant-guanaco", format="text", quant="nf4", double_quant=True,
             compute_dtype="bf16", optim="paged_adamw", r=64, alpha=16.0, target="all-linear", max_grad_norm=0.3,
             adam_beta2=0.999, weight_decay=0.0, batch_size=1, grad_accum=16, max_steps=1875, schedule="constant",
             warmup_steps=0, group_by_length=True, gradient_checkpointing=True, source_max_len=16,
             target_max_len=512, train_on_inputs=False, seed=0)
# Per size: lr 2e-4 for 7B/13B and 1e-4 for 33B/65B; LoRA dropout 0.1 up to 13B, 0.05 above
# (Appendix B.2); the LLaMA base by the hub name the paper's README uses (33B is "llama-30b" there).
SIZES = {"guanaco-7b": dict(model="huggyllama/llama-7b", lr=2e-4, dropout=0.1),
         "guanaco-13b": dict(model="huggyllama/llama-13b", lr=2e-4, dropout=0.1),
         "guanaco-33b": dict(model="huggyllama/llama-30b", lr=1e-4, dropout=0.05),
         "guanaco-65b": dict(model="huggyllama/llama-65b", lr=1e-4, dropout=0.05)}


def test_the_shipped_recipes_are_the_four_guanaco_runs():
    assert list(recipes()) == list(SIZES)
    for name, path in recipes().items():
        assert describe(path).startswith(f"Guanaco-{name.split('-')[1].upper()}: ")


@pytest.mark.parametrize("name", list(SIZES))
def test_recipe_parses_into_train_config_with_the_papers_numbers(name):
    cfg, given = parse_cli(TrainConfig, ["--config", name], prog="t", recipes=recipes())
    want = {**PAPER, **SIZES[name], "output": f"runs/{name}"}
    assert {k: getattr(cfg, k) for k in want} == want
    assert set(want) <= given  # every number is the recipe's own, not a default that might change
    assert apply_demo_preset(cfg, given) == cfg  # real data: the demo preset stays out of it
    # 16 sequences per optimizer step, 1,875 steps: 30,000 sequences, ~3 epochs of OASST1's 9,846 rows
    assert cfg.batch_size * cfg.grad_accum * cfg.max_steps == 30_000


def test_flags_override_a_recipe():
    cfg, _ = parse_cli(TrainConfig, ["--config", "guanaco-7b", "--model", "/models/llama", "--max-steps", "10"],
                       prog="t", recipes=recipes())
    assert cfg.model == "/models/llama" and cfg.max_steps == 10 and cfg.lr == 2e-4


def test_a_file_wins_over_a_recipe_name_and_unknown_names_list_the_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "guanaco-7b").write_text("lr: 0.003\n")  # a user's file that happens to share the name
    cfg, _ = parse_cli(TrainConfig, ["--config", "guanaco-7b"], prog="t", recipes=recipes())
    assert cfg.lr == 0.003 and cfg.model != "huggyllama/llama-7b"
    (tmp_path / "mine.yaml").write_text("r: 8\n")
    cfg, _ = parse_cli(TrainConfig, ["--config=mine.yaml"], prog="t", recipes=recipes())
    assert cfg.r == 8
    with pytest.raises(UserError, match=r"--config guanaco-8b: no such file and no recipe.*guanaco-7b, guanaco-13b"):
        parse_cli(TrainConfig, ["--config", "guanaco-8b"], prog="t", recipes=recipes())
    with pytest.raises(UserError, match=r"--config other\.yaml: no such file"):  # looks like a path: not a recipe
        parse_cli(TrainConfig, ["--config", "other.yaml"], prog="t", recipes=recipes())
    (tmp_path / "guanaco-7b").unlink()
    with pytest.raises(UserError, match=r"--config guanaco-7b: no such file$"):  # a command without recipes
        parse_cli(TrainConfig, ["--config", "guanaco-7b"], prog="t")


def test_config_list_prints_one_line_per_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_cmd.run(["--config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(SIZES)
    assert "lr 1e-4" in lines[2] and "dropout 0.05" in lines[2] and "lr 2e-4" in lines[0]
