"""Synthetic task generators, the training recipe's CPU smoke, and the shipped focus-tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from focusdllm.tasks import GEN_LENGTH, TASKS, VOCAB, dense_decode, make_cases, render, target_ids

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "src" / "focusdllm" / "weights" / "focus-tiny"


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_by_seed(task):
    a = make_cases(task, 3, 700, seed=5)
    assert a == make_cases(task, 3, 700, seed=5)
    assert a[0]["input"] != make_cases(task, 3, 700, seed=6)[0]["input"]
    assert make_cases(task, 2, 700, seed=5) == a[:2]  # case i does not depend on n


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [400, 1000, 4096])
def test_length_exact_and_fields(task, length):
    for c in make_cases(task, 4, length, seed=1):
        assert len(c["input"]) == c["length"] == length
        assert set(c) >= {"index", "input", "outputs", "length", "gen_length", "depth", "needle_pos"}
        assert c["gen_length"] == GEN_LENGTH[task] and c["gen_length"] % 32 == 0
        tgt = target_ids(c)
        assert len(tgt) == c["gen_length"] and tgt[len(c["outputs"]):] == [VOCAB.eos_id] * (
            c["gen_length"] - len(c["outputs"]))
        assert c["input"][0] == VOCAB.bos_id and all(0 <= t < VOCAB.size for t in c["input"])
        assert VOCAB.mask_id not in c["input"] and VOCAB.eos_id not in c["input"]
        json.dumps(c)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_at_depth_and_answer_consistent(task, depth):
    length = 2000
    for c in make_cases(task, 3, length, seed=2, depth=depth):
        ids, ans, p, a = c["input"], c["outputs"], c["needle_pos"], c["answer_pos"]
        assert ids[a:a + len(ans)] == ans
        marker = {"passkey": VOCAB.PASS, "multikey": VOCAB.KEY, "spancopy": VOCAB.COPY}[task]
        assert ids[p] == marker
        # the query at the end repeats the needle's prefix: marker (+ key)
        prefix = ids[p:a]
        assert ids[-len(prefix):] == prefix and ids[-len(prefix) - 1] == VOCAB.QUERY
        assert ids.count(marker) == {"passkey": 2, "multikey": 5, "spancopy": 4}[task]
        # the target needle has round(depth * filler) filler words before it
        n_fill = sum(VOCAB.filler0 <= t < VOCAB.marker0 for t in ids)
        before = sum(VOCAB.filler0 <= t < VOCAB.marker0 for t in ids[:p])
        assert before == round(depth * n_fill)


def test_needles_are_unambiguous():
    for task in ("multikey", "spancopy"):
        for c in make_cases(task, 5, 3000, seed=3):
            ids = c["input"]
            keys = [ids[i + 1] for i in range(len(ids) - 1) if ids[i] in (VOCAB.KEY, VOCAB.COPY)]
            assert len(keys) == len(set(keys)) + 1  # every key once, plus the query's repeat
            if task == "spancopy":
                syms = [t for t in ids if VOCAB.span0 <= t < VOCAB.filler0]
                assert len(syms) == len(set(syms))
            else:
                digits = [(ids[i], ids[i + 1]) for i in range(len(ids) - 1) if ids[i + 1] < 10]
                assert len(digits) == len(set(digits))  # 2-token contexts are unique
    c = make_cases("spancopy", 20, 1000, seed=0)
    assert all(32 <= len(x["outputs"]) <= 96 for x in c)


def test_vocab_roundtrip_and_render():
    c = make_cases("passkey", 1, 500, seed=0)[0]
    assert VOCAB.encode(VOCAB.decode(c["input"])) == c["input"]
    assert "<pass>" in render(c) and VOCAB.decode(c["outputs"]) in render(c)
    with pytest.raises(ValueError, match="too short"):
        make_cases("spancopy", 1, 50, seed=0)


def _load_train():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "bench" / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_smoke(tmp_path):
    train = _load_train()
    train.main(["--preset", "smoke", "--out", str(tmp_path), "--steps", "24", "--log-every", "4"])
    recs = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2])
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    from focusdllm import load_model

    m = load_model(tmp_path)
    assert m.config.mask_id == VOCAB.mask_id and m.config.vocab_size == VOCAB.size


def test_train_resume_continues_the_run_exactly(tmp_path):
    """A run paused by --stop-after, or ended early by --end-at, and continued with --resume ends with the same
    weights as one uninterrupted run (batches are a function of the step; Adam, the step count and the masking
    generator come back from the checkpoint); the continuing presets refuse to start without --init-from."""
    from safetensors.torch import load_file

    train = _load_train()
    kw = ["--preset", "smoke", "--steps", "12", "--log-every", "4", "--eval-lengths", "320", "--eval-n", "1"]
    train.main(kw + ["--out", str(tmp_path / "whole")])
    train.main(kw + ["--out", str(tmp_path / "part"), "--stop-after", "1e-9"])  # pauses after its first step
    paused = [json.loads(x) for x in (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "paused" and r["step"] < 12 for r in paused)
    train.main(kw + ["--out", str(tmp_path / "part"), "--resume", str(tmp_path / "part" / "ckpt.pt")])
    # --end-at 0.5 trains the first half of the same schedule and finishes there: resumed, it ends as `whole`
    train.main(kw + ["--out", str(tmp_path / "head"), "--end-at", "0.5"])
    head = [json.loads(x) for x in (tmp_path / "head" / "train_log.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in head if r.get("event") == "trained"] == [6]
    assert any(r.get("event") == "final_eval" for r in head)
    train.main(kw + ["--out", str(tmp_path / "head"), "--resume", str(tmp_path / "head" / "ckpt.pt")])
    whole, part, head = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "part", "head"))
    assert whole.keys() == part.keys() and all(torch.equal(whole[k], part[k]) for k in whole)
    assert all(torch.equal(whole[k], head[k]) for k in whole)
    for preset in train.CONTINUING:
        with pytest.raises(SystemExit, match="pass --init-from"):
            train.parse_args(["--preset", preset, "--out", str(tmp_path / "x")])


def test_train_recipe_in_one_process_equals_the_stages_run_apart(tmp_path):
    """bench/train_recipe.py runs the stages in one process, the model and its forward kept from one to the next:
    every stage ends with the same weights as the same presets run one by one (--init-from the stage before)."""
    from safetensors.torch import load_file

    train = _load_train()
    spec = importlib.util.spec_from_file_location("train_recipe", ROOT / "bench" / "train_recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    common = ["--steps", "8", "--log-every", "4", "--eval-lengths", "320", "--eval-n", "1", "--loss-rows", "1"]
    rec = recipe.main(["--out", str(tmp_path / "one"), "--stages", "smoke,smoke,smoke", "--suite-lengths", "384",
                       "--", *common])
    prev = []
    for d in ("a", "b", "c"):
        train.main(["--preset", "smoke", "--out", str(tmp_path / d), *common, *prev])
        prev = ["--init-from", str(tmp_path / d)]
    for one, apart in (("one/stage1", "a"), ("one/stage2", "b"), ("one", "c")):
        w1, w2 = (load_file(tmp_path / f / "model.safetensors") for f in (one, apart))
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), one
    assert [s["preset"] for s in rec["stages"]] == ["smoke"] * 3 and rec["recipe_secs"] > 0
    assert all(s["tail_loss"] > 0 for s in rec["stages"])  # the mean of each stage's logged losses (2 lines)
    suite = json.loads((tmp_path / "one" / "eval.json").read_text())["suite"]
    assert {r["length"] for r in suite} == {384} and list(rec["suite_acc"]) == [384]
    assert rec["suite_pass"] == (rec["suite_acc"][384] >= 0.95)
    assert json.loads((tmp_path / "one" / "recipe.json").read_text()) == json.loads(json.dumps(rec))
    # the verdict: exact match pooled over tasks and case sets per length; every length must reach 95 %
    one = {"length": 2048, "n": 10}
    assert recipe.suite_verdict([{**one, "acc": 1.0}, {**one, "acc": 0.9}]) == {"suite_acc": {2048: 0.95},
                                                                               "suite_pass": True}
    assert not recipe.suite_verdict([{**one, "acc": 1.0}, {**one, "acc": 1.0, "length": 4096, "n": 20},
                                     {**one, "acc": 0.8, "length": 4096}])["suite_pass"]


def test_train_step_skips_non_finite_gradients():
    """A NaN gradient skips the optimizer step on the device (no host sync): weights and Adam state stay as
    they were; the next finite step updates them."""
    train = _load_train()
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    assert not torch.isfinite(train.optimizer_step(model, opt))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(float(st["step"]) == 0 for st in opt.state.values())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    train.optimizer_step(model, opt)
    assert all(not torch.equal(p, b) and torch.isfinite(p).all() for p, b in zip(model.parameters(), before))


def test_train_batches_built_ahead_equal_inline():
    """A fixed-step run's batches are a function of (args, step): DataLoader workers build the same ones
    the loop would build inline, in step order, so --workers does not change the run."""
    train = _load_train()
    sys.path.insert(0, str(ROOT / "bench"))
    from train_data import StepBatches, loss_rows, step_batch

    a = train.parse_args(["--preset", "smoke", "--out", "/tmp/unused", "--steps", "6", "--min-len", "320",
                          "--max-len", "2048", "--hold", "0", "--ramp", "0.5", "--loss-rows", "1"])
    loader = torch.utils.data.DataLoader(StepBatches(a), batch_size=None, sampler=range(2, 6), num_workers=2)
    got = list(loader)
    assert len({g[0] for g in got}) > 1  # the curriculum moves: several lengths
    for step, (L, ids, region, rows) in zip(range(2, 6), got):
        L0, ids0, region0 = step_batch(a, step, step / a.steps)
        assert L == L0 and torch.equal(ids, ids0) and torch.equal(region, region0)
        want = loss_rows(region0)
        assert (rows is None and want is None) or torch.equal(rows, want)


def test_train_loss_on_region_rows_equals_the_full_loss():
    """The loss through `loss_rows` (the last layer on the answer tail only) equals the loss over the full logits,
    and so do its gradients, on task rows of all three tasks; a batch with copy rows takes the full forward."""
    import random

    train = _load_train()
    sys.path.insert(0, str(ROOT / "bench"))
    from train_data import TAIL, loss_rows, make_batch

    a = train.parse_args(["--preset", "smoke", "--out", "/tmp/unused"])
    model = train.init_random(train.DiffusionLM(train.build_config(a)), seed=0)
    ids, region = make_batch(random.Random(5), 384, 9, task_weights=[1, 1, 1])
    assert region.sum(1).min() < TAIL == region.sum(1).max()  # passkey / multikey regions are shorter than the tail
    rows = loss_rows(region)
    assert rows.shape == (9, TAIL) and bool(region.gather(1, rows).sum() == region.sum())
    assert loss_rows(make_batch(random.Random(5), 384, 8, aux_frac=0.5)[1]) is None
    out = []
    for kw in ({}, {"rows": rows}):
        model.zero_grad()
        loss, ce = train.diffusion_loss(model, ids, region, torch.Generator().manual_seed(1), t_weight=False, **kw)
        loss.backward()
        out.append((loss, ce, [p.grad.clone() for p in model.parameters()]))
    (l0, c0, g0), (l1, c1, g1) = out
    assert abs(l0 - l1) < 1e-5 and abs(c0 - c1) < 1e-5
    assert all((x - y).abs().max() <= 1e-5 * x.abs().max() for x, y in zip(g0, g1))


@pytest.mark.parametrize("span_other", [0.0, 1.0])
def test_train_span_other_asks_a_shorter_span(span_other):
    """--span-other 1: every span-copy row asks a needle other than the longest and its region holds that needle's
    span, then EOS; --span-other 0: the longest, as the suite asks."""
    import random

    sys.path.insert(0, str(ROOT / "bench"))
    from train_data import make_batch

    from focusdllm.tasks import needles

    L, gl = 640, 128
    ids, region = make_batch(random.Random(3), L, 6, tasks=("spancopy",), span_other=span_other)
    for row, reg in zip(ids.tolist(), region.tolist()):
        prompt, answer = row[: L - gl], row[L - gl:]
        assert reg == [False] * (L - gl) + [True] * gl
        found = needles({"task": "spancopy", "input": prompt})
        asked = [value for _, key, value in found if key == prompt[-1]]
        longest = max((value for _, _, value in found), key=len)
        assert len(asked) == 1 and (asked[0] == longest) == (span_other == 0.0)
        assert answer == asked[0] + [VOCAB.eos_id] * (gl - len(asked[0]))


@pytest.mark.parametrize("length", [320, 2048])
def test_train_keyed_rows_are_answered_only_through_the_key(length):
    """Keyed rows (--aux-keyed): every needle `<key> kX d..d` appears twice with distinct keys, the second copies come
    as queries (`<query>` first) in another order than the first, and the loss region is exactly the second copies'
    values, each equal to the value after the same key's first copy; a batch with --aux-keyed holds that share of its
    copy rows as keyed rows."""
    import random

    sys.path.insert(0, str(ROOT / "bench"))
    from train_data import keyed_rows, make_batch

    ids, region = keyed_rows(random.Random(length), length, 6)
    assert ids.shape == region.shape == (6, length)
    reordered = 0
    for row, reg in zip(ids.tolist(), region.tolist()):
        at = [i for i, t in enumerate(row) if t == VOCAB.KEY]
        keys = [row[i + 1] for i in at]
        n = len(keys) // 2
        assert n >= 2 and sorted(keys[:n]) == sorted(keys[n:]) and len(set(keys[:n])) == n
        assert all(VOCAB.key0 <= k < VOCAB.key0 + VOCAB.n_keys for k in keys)
        assert [row[i - 1] == VOCAB.QUERY for i in at] == [False] * n + [True] * n and row[0] == VOCAB.bos_id
        first = {row[i + 1]: i + 2 for i in at[:n]}
        want = [False] * length
        for i in at[n:]:
            m = next(j for j in range(i + 2, length + 1) if j == length or not VOCAB.digit0 <= row[j] < 10) - i - 2
            src = first[row[i + 1]]
            assert row[i + 2: i + 2 + m] == row[src: src + m]  # the value after the same key's first copy
            want[i + 2: i + 2 + m] = [True] * m
        assert reg == want
        reordered += keys[:n] != keys[n:]
    assert reordered >= 5  # the second copies' order is drawn apart from the first
    ids, region = make_batch(random.Random(2), length, 10, aux_frac=1.0, aux_kw={"exact": 0.0, "keyed": 0.5})
    n_keyed = sum((row == VOCAB.KEY).sum().item() >= 4 for row in ids)
    assert n_keyed == 5


def test_train_compile_per_block_equals_eager():
    """--compile 2 (one compiled Block.forward for every block): the loss and gradients equal the eager model's at
    two lengths, with and without the loss rows, from one graph per call form (no recompile per block or length)."""
    import copy
    import random

    from torch._dynamo.utils import counters

    train = _load_train()
    sys.path.insert(0, str(ROOT / "bench"))
    from train_data import loss_rows, make_batch

    a = train.parse_args(["--preset", "smoke", "--out", "/tmp/unused"])
    eager = train.init_random(train.DiffusionLM(train.build_config(a)), seed=0)
    torch._dynamo.reset()
    counters.clear()
    regional = train.compiled_forward(copy.deepcopy(eager), 2)
    for L, n in ((320, 6), (384, 5)):
        ids, region = make_batch(random.Random(L), L, n, task_weights=[1, 1, 1])
        for rows in (None, loss_rows(region)):
            out = []
            for model in (eager, regional):
                model.zero_grad()
                gen = torch.Generator().manual_seed(1)
                loss, _ = train.diffusion_loss(model, ids, region, gen, t_weight=False, rows=rows)
                loss.backward()
                out.append((loss, [p.grad.clone() for p in model.parameters()]))
            (l0, g0), (l1, g1) = out
            assert abs(l0 - l1) <= 1e-5 * abs(l0), (L, rows is None)
            assert all((x - y).abs().max() <= 1e-4 * x.abs().max() for x, y in zip(g0, g1)), (L, rows is None)
    assert counters["stats"]["unique_graphs"] == 2  # full rows and loss rows; 4 blocks x 2 lengths reuse them
    with pytest.raises(SystemExit, match="--compile 3"):
        train.compiled_forward(eager, 3)


@pytest.mark.skipif(not (WEIGHTS / "model.safetensors").is_file(), reason="focus-tiny weights not shipped yet")
def test_focus_tiny_solves_short_passkey():
    from focusdllm import load_model

    torch.manual_seed(0)
    model = load_model("focus-tiny")
    assert model.config.vocab_size == VOCAB.size and model.config.mask_id == VOCAB.mask_id
    cases = make_cases("passkey", 4, 1024, seed=7)  # inside the trained lengths (320 to 16.5K tokens)
    prompts = torch.tensor([c["input"] for c in cases])
    out = dense_decode(model, prompts, cases[0]["gen_length"], tokens_per_step=2).tolist()
    for c, o in zip(cases, out):
        assert o[: len(c["outputs"])] == c["outputs"], render(c)


def test_multikey_never_runs_out_of_digit_bigrams():
    """Dense needles (10 keys x 8 digits = 80 of the 100 digit bigrams) can leave a digit with no unused
    successor; the draw restarts instead of failing (training once stopped on this), and stays unique."""
    for seed in range(3):
        for c in make_cases("multikey", 40, 400, seed=seed, n_needles=10, answer_len=8):
            inp = c["input"]  # filler has no digits: every digit sits in a needle, after a key or a digit
            is_digit = [VOCAB.digit0 <= t < VOCAB.digit0 + 10 for t in inp]
            pairs = [(inp[i - 1], inp[i]) for i in range(1, len(inp)) if is_digit[i]]
            assert len(pairs) == 80
            assert len(pairs) == len(set(pairs))


@pytest.mark.parametrize("task", ["multikey", "spancopy"])
def test_needles_lists_every_needle_with_its_value(task):
    """`needles` reads the case's needles back from the prompt: as many as generated, distinct keys, the asked one
    at needle_pos with the answer as its value."""
    from focusdllm.tasks import needles

    for c in make_cases(task, 6, 700, seed=4):
        found = needles(c)
        assert len(found) == (4 if task == "multikey" else 3) and len({k for _, k, _ in found}) == len(found)
        asked = [(at, value) for at, k, value in found if k == c["input"][-1]]
        assert asked == [(c["needle_pos"], c["outputs"])]


@pytest.mark.parametrize("task", ["multikey", "spancopy"])
def test_ask_other_key_names_another_needle(task):
    """The counterfactual query changes only the query's key; its answer is exactly the tokens after that key's
    needle marker (read back from the prompt), and differs from the original answer; passkey is refused."""
    from focusdllm.tasks import ask_other_key

    v = VOCAB
    marker = v.KEY if task == "multikey" else v.COPY
    for c in make_cases(task, 6, 600, seed=3):
        o = ask_other_key(c)
        assert o["input"][:-1] == c["input"][:-1] and o["input"][-1] != c["input"][-1]
        key = o["input"][-1]
        at = [i for i in range(len(c["input"]) - 3) if c["input"][i] == marker and c["input"][i + 1] == key]
        assert at == [o["needle_pos"]]
        n = len(o["outputs"])
        assert n >= (4 if task == "multikey" else 8) and o["outputs"] != c["outputs"]
        assert o["outputs"] == c["input"][at[0] + 2:at[0] + 2 + n]
        lo, hi = (v.digit0, v.digit0 + 10) if task == "multikey" else (v.span0, v.span0 + v.n_span)
        assert all(lo <= t < hi for t in o["outputs"])
        assert not lo <= c["input"][at[0] + 2 + n] < hi  # the needle ends there (filler or a marker)
    with pytest.raises(ValueError, match="multikey or spancopy"):
        ask_other_key(make_cases("passkey", 1, 600)[0])
    with pytest.raises(ValueError, match="n_needles >= 2"):
        ask_other_key(make_cases(task, 1, 600, n_needles=1)[0])
