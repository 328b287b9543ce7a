"""`edge-mmm devices` and `edge-mmm plan` through the CLI entry point."""

import json

from edge_mmm.cli import main


def test_devices_json(capsys):
    assert main(["devices", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = [p["id"] for p in out["profiles"]]
    assert "orin-nano-8gb" in ids and sum(p["detected"] for p in out["profiles"]) <= 1
    assert out["detected"]["profile_id"] in ids + [""]


def test_devices_table(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "orin-nx-16gb" in out and "detected:" in out


def test_plan_fits(capsys):
    assert main(["plan", "--device", "orin-nano-8gb", "--asr", "tiny.en", "--vlm", "smolvlm-256m",
                 "--quant", "int4", "--context", "2048"]) == 0
    out = capsys.readouterr().out
    assert "runtime    overhead" in out and "-> fits" in out


def test_plan_refused_exits_2_with_numbers(capsys, tmp_path):
    cfg = tmp_path / "llama8b.json"  # Llama-3.1-8B dims
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                               "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                               "tie_word_embeddings": False, "max_position_embeddings": 131072}))
    code = main(["plan", "--device", "orin-nano-8gb", "--llm", str(cfg), "--quant", "fp16", "--json"])
    cap = capsys.readouterr()
    assert code == 2
    plan = json.loads(cap.out)
    assert plan["fits"] is False and plan["request"]["llm"] == "llama8b" and plan["total_mib"] > 15000
    assert "does not fit on orin-nano-8gb" in cap.err and "MiB usable" in cap.err


def test_plan_unknown_device(capsys):
    assert main(["plan", "--device", "nope"]) == 2
    assert "unknown device profile" in capsys.readouterr().err
