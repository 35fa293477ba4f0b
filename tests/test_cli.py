"""The command line (cli.py): bad input is one `error:` line naming the mistake and exit code 2,
before any work; a good `run` prints its metrics and writes them, with the generated token ids,
as JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertmesh.cli import main
from expertmesh.config import Workload, preset
from expertmesh.model.transformer import reference_model

# name: (argv, a part of the expected message)
BAD_INPUT = {
    "batch 0": (["run", "--batch", "0"], "batch size 0 must be at least 1"),
    "too long": (["run", "--prompt-len", "500", "--gen-len", "13"],  # tiny: max_seq_len 512
                 "= 513 exceeds the model's maximum length 512"),
    "token outside vocabulary": (["run", "--prompt-ids", "1,2;3,1024"],  # tiny: vocab 1024
                                 "token id 1024 is outside the vocabulary [0, 1024)"),
    "negative token": (["run", "--prompt-ids", "1,-2"], "token id -2 is outside the vocabulary"),
    "empty prompt": (["run", "--prompt-ids", "1,2;"], "prompt ids are empty"),
    "unreadable prompts": (["run", "--prompt-ids", "1,x"], "cannot read --prompt-ids '1,x'"),
    "unknown preset": (["run", "--preset", "nope"], "unknown preset 'nope'; use one of: paper, tiny, small"),
    "unknown dtype": (["run", "--dtype", "fp16"], "unknown dtype 'fp16'; use one of: fp32, bf16"),
    "generation 0": (["run", "--gen-len", "0"], "generation length 0 must be at least 1"),
    "negative temperature": (["run", "--temperature", "-1"], "temperature -1.0 must be >= 0"),
    "top-p 0": (["run", "--top-p", "0"], "top_p 0.0 must be in (0, 1]"),
    "micro-batches 0": (["run", "--micro-batches", "0"], "micro-batches 0 must be at least 1"),
    "compare unknown preset": (["compare", "--preset", "nope"], "unknown preset 'nope'"),
    "compare batch 0": (["compare", "--batch", "0"], "batch size 0 must be at least 1"),
    "compare no deployments": (["compare", "--deployments", ","], "--deployments is empty"),
}


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_one_error_line_and_exit_code_2(name, cli_error):
    argv, expected = BAD_INPUT[name]
    assert expected in cli_error(argv)


def test_run_prints_metrics_and_writes_them_with_the_greedy_tokens(tmp_path, capsys, naive_greedy):
    path = tmp_path / "out" / "run.json"
    argv = ["run", "--preset", "tiny", "--batch", "2", "--prompt-len", "8", "--gen-len", "4",
            "--json", str(path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "TPOT (ms)" in out and "decode TPS" in out and "Traceback" not in err

    data = json.loads(path.read_text())
    metrics = data["result"]["metrics"]
    assert (metrics["batch_size"], metrics["prompt_len"], metrics["gen_len"]) == (2, 8, 4)
    assert metrics["ttft_s"] > 0 and metrics["tpot_s"] > 0 and metrics["overall_tps"] > 0
    assert data["preset"]["name"] == "tiny" and data["workload"]["gen_len"] == 4
    assert data["result"]["prompt_tokens"] == {"total": 16, "cached": 0, "computed": 16}

    cfg = preset("tiny")
    prompts = Workload(batch_size=2, prompt_len=8, gen_len=4, seed=0).prompts(cfg)
    expected = naive_greedy(reference_model(cfg, seed=0), prompts, 4)
    assert data["result"]["tokens"] == expected.tolist()


def test_run_takes_prompts_of_different_lengths_and_gives_each_its_greedy_tokens(tmp_path, naive_greedy):
    path = tmp_path / "run.json"
    assert main(["run", "--preset", "tiny", "--prompt-ids", "1,2,3;4,5", "--gen-len", "3",
                 "--deployment", "ep2", "--json", str(path)]) == 0
    result = json.loads(path.read_text())["result"]
    tokens = result["tokens"]
    assert result["prompt_tokens"] == {"total": 5, "cached": 0, "computed": 5}  # each DP rank once
    model = reference_model(preset("tiny"), seed=0)
    assert tokens == [naive_greedy(model, torch.tensor([p]), 3)[0].tolist() for p in ([1, 2, 3], [4, 5])]


def test_the_console_script_reports_an_unknown_preset_in_one_line():
    script = Path(sys.executable).parent / "expertmesh"
    assert script.exists(), "install the package (pip install -e .) to get the console script"
    proc = subprocess.run([str(script), "run", "--preset", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: unknown preset 'nope'"), proc.stderr
