"""The fidelity suite: bootstrap CI, the eval command end to end, and a smoke eval of the shipped model."""

import json

import pytest
import torch

import focusdllm
from focusdllm.evaluate import bootstrap_ci, main
from focusdllm.models.loading import WEIGHTS_DIR
from focusdllm.tasks import VOCAB


def test_bootstrap_ci_brackets_the_mean():
    lo, hi = bootstrap_ci([True] * 30 + [False] * 10)
    assert lo < 0.75 < hi and 0.5 < lo and hi < 0.95
    assert bootstrap_ci([True] * 5) == (1.0, 1.0)


def test_summarize_reports_each_task():
    """Exact match per task beside the pooled one: passkey answered, multikey not -> 1.0 / 0.0, pooled 0.5."""
    from focusdllm.evaluate import summarize
    from focusdllm.tasks import make_cases

    cases = make_cases("passkey", 2, 300) + make_cases("multikey", 2, 300)
    right = [c["outputs"] + [VOCAB.eos_id] for c in cases]
    wrong = [r if c["task"] == "passkey" else [VOCAB.eos_id] * len(r) for c, r in zip(cases, right)]
    rows = summarize(cases, {"dense": right, "focus": wrong})
    assert rows["dense"]["by_task"] == {"passkey": 1.0, "multikey": 1.0}
    assert rows["focus"]["by_task"] == {"passkey": 1.0, "multikey": 0.0} and rows["focus"]["acc"] == 0.5


def test_eval_command_writes_table_and_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = focusdllm.ModelConfig.from_name("llada-tiny").with_(
        vocab_size=VOCAB.size, mask_id=VOCAB.mask_id, eos_id=VOCAB.eos_id, pad_id=VOCAB.pad_id, bos_id=VOCAB.bos_id
    )
    model = focusdllm.models.init_random(focusdllm.DiffusionLM(cfg), seed=0).eval()
    focusdllm.save_model(model, tmp_path / "m")
    out = tmp_path / "r.json"
    main(["--model", str(tmp_path / "m"), "--tasks", "passkey", "--lengths", "200", "--depths", "2",
          "--per-depth", "1", "--device", "cpu", "--modes", "dense", "focus", "--out", str(out),
          "--heatmap", str(tmp_path / "h.png")])
    res = json.loads(out.read_text())
    s = res["summary"]["200"]
    assert s["dense"]["agreement"] == 1.0 and s["dense"]["n"] == 2 and 0 <= s["focus"]["acc"] <= 1
    assert (tmp_path / "h.png").stat().st_size > 1000


@pytest.mark.skipif(not (WEIGHTS_DIR / "focus-tiny").is_dir(), reason="focus-tiny weights not shipped")
def test_shipped_model_smoke_eval():
    """CPU smoke: the shipped model solves 1K passkey cases densely, the cache keeps that, and the
    instrument is sensitive (a broken sparse setting loses). Focus's own accuracy is reported by
    `focusdllm eval` (bench/results/fidelity_h100.json), not pinned here."""
    from focusdllm.evaluate import run_cases, summarize
    from focusdllm.tasks import make_cases

    model = focusdllm.load_model("focus-tiny", dtype=torch.float32)
    cases = make_cases("passkey", 4, 1024, seed=7)
    preds, _ = run_cases(model, cases, ["dense", "fastdllm", "focus", "bad"], log=lambda s: None)
    rows = summarize(cases, preds)
    assert rows["dense"]["acc"] >= 0.75
    assert rows["fastdllm"]["agreement"] >= 0.95
    assert rows["bad"]["acc"] < rows["dense"]["acc"]


@pytest.mark.skipif(not (WEIGHTS_DIR / "focus-tiny").is_dir(), reason="focus-tiny weights not shipped")
def test_eval_ask_other_queries_a_distractor(tmp_path, monkeypatch):
    """`--ask-other` decodes every case with the query naming another needle (`tasks.ask_other_key`); the
    shipped model reads multikey's key, so it answers the asked needle. Passkey (one needle) is refused."""
    import focusdllm.evaluate as ev

    seen = []

    def spy(model, cases, modes, **kw):
        seen.extend(cases)
        return run(model, cases, modes, **kw)

    run = ev.run_cases
    monkeypatch.setattr(ev, "run_cases", spy)
    out = tmp_path / "r.json"
    main(["--tasks", "multikey", "--lengths", "2048", "--depths", "5", "--per-depth", "1", "--device", "cpu",
          "--dtype", "float32", "--modes", "dense", "--ask-other", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["ask_other"] and len(seen) == 5 and all(c.get("asked") == "other" for c in seen)
    assert res["summary"]["2048"]["dense"]["acc"] >= 0.8
    with pytest.raises(SystemExit):
        main(["--tasks", "passkey", "--ask-other", "--lengths", "1024", "--device", "cpu"])
