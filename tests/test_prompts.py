import csv
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prdp_ds import prompts as P
from prdp_ds.prompts import PromptSampler, load_prompts, rank_slice

RAW = ["a red cat", "  a blue dog  ", "", "a red cat", "a green fox"]  # 1 empty, 1 duplicate
CLEAN = ["a red cat", "a blue dog", "a green fox"]


def write(tmp_path, ext, values, field="prompt"):
    """A prompt file of the given type holding `values` (strings, or None / numbers for json-like formats)."""
    path = tmp_path / f"prompts{ext}"
    if ext == ".txt":
        path.write_text("\n".join(values) + "\n", encoding="utf-8")
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps({field: v, "id": i}) + "\n" for i, v in enumerate(values)))
    elif ext == ".json":
        path.write_text(json.dumps([{field: v, "id": i} for i, v in enumerate(values)]))
    elif ext == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", field])
            w.writerows([i, v] for i, v in enumerate(values))
    elif ext == ".parquet":
        pq.write_table(pa.table({"id": list(range(len(values))), field: values}), path)
    return path


FORMATS = [".txt", ".jsonl", ".json", ".csv", ".parquet"]


@pytest.mark.parametrize("ext", FORMATS)
def test_each_format_cleans_templates_and_counts(tmp_path, ext):
    ps = load_prompts(write(tmp_path, ext, RAW), template="A painting of {}")
    assert list(ps) == [f"A painting of {p}" for p in CLEAN]
    assert len(ps) == 3 and ps[1] == "A painting of a blue dog" and ps.prompts == tuple(ps)
    assert ps.counts == {
        "read": 5,
        "empty": 1,
        "invalid": 0,
        "duplicates": 1,
        "over_length": 0,
        "dropped": 0,
        "kept": 3,
    }
    assert ps.summary() == f"prompts: 3 from prompts{ext} (1 empty, 1 duplicates skipped)"


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_custom_field(tmp_path, ext):
    path = write(tmp_path, ext, CLEAN, field="caption")
    assert list(load_prompts(path, field="caption")) == CLEAN
    with pytest.raises(ValueError, match=r"prompts\.field.*'prompt'.*caption"):
        load_prompts(path)  # default field 'prompt' is absent: the error lists what was found


@pytest.mark.parametrize("doc", [CLEAN, {"prompts": CLEAN}, {"prompts": [{"prompt": p} for p in CLEAN]}])
def test_json_shapes(tmp_path, doc):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    assert list(load_prompts(path)) == CLEAN


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet"])
def test_non_string_entries_are_invalid(tmp_path, ext):
    values = ["a cat", None, "a dog", None] if ext == ".parquet" else ["a cat", None, 7, "a dog", ["x"]]
    ps = load_prompts(write(tmp_path, ext, values))
    assert list(ps) == ["a cat", "a dog"]
    assert ps.counts["invalid"] == len(values) - 2 and ps.counts["read"] == len(values)
    assert f"{len(values) - 2} invalid" in ps.summary()


def test_json_objects_missing_the_field_count_as_invalid(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a cat"}, {"caption": "a dog"}, 3.5, "a fox"]))
    ps = load_prompts(path)
    assert list(ps) == ["a cat", "a fox"] and ps.counts["invalid"] == 2


@pytest.mark.parametrize("dedupe, kept, dups", [(True, ["a", "b", "c"], 3), (False, ["a", "b", "a", "c", "a", "b"], 0)])
def test_dedupe_keeps_first_occurrence(tmp_path, dedupe, kept, dups):
    path = write(tmp_path, ".txt", ["a", "b", " a", "c", "a ", "b"])
    ps = load_prompts(path, dedupe=dedupe)
    assert list(ps) == kept and ps.counts["duplicates"] == dups and ps.counts["kept"] == len(kept)


def fake_lengths(prompts):
    return [len(p.split()) + 2 for p in prompts]  # words + BOS/EOS


@pytest.mark.parametrize(
    "mode, kept", [("truncate", ["one", "one two", "one two three four"]), ("drop", ["one", "one two"])]
)
def test_over_length(tmp_path, mode, kept):
    path = write(tmp_path, ".txt", ["one", "one two", "one two three four"])
    ps = load_prompts(path, over_length=mode, token_lengths=fake_lengths, max_tokens=5)
    assert list(ps) == kept
    assert ps.counts["over_length"] == 1 and ps.counts["dropped"] == (mode == "drop")
    c = ps.counts
    assert c["read"] == c["empty"] + c["invalid"] + c["duplicates"] + c["dropped"] + c["kept"]
    action = {"truncate": "truncated", "drop": "dropped"}[mode]
    assert ps.summary() == f"prompts: {len(kept)} from prompts.txt (1 over 5 tokens {action})"


def test_over_length_measures_templated_prompts(tmp_path):
    path = write(tmp_path, ".txt", ["one", "one two"])
    ps = load_prompts(path, template="A painting of {}", over_length="drop", token_lengths=fake_lengths, max_tokens=6)
    assert list(ps) == ["A painting of one"] and ps.counts["dropped"] == 1


def test_summary_thousands_and_fingerprint(tmp_path):
    path = write(tmp_path, ".txt", [f"p{i}" for i in range(1234)] + ["p0"] * 12 + [""] * 3)
    ps = load_prompts(path, token_lengths=lambda ps: [78 if p.endswith("7") else 5 for p in ps], max_tokens=77)
    assert ps.summary() == (
        "prompts: 1,234 from prompts.txt (3 empty, 12 duplicates skipped, 123 over 77 tokens truncated)"
    )
    assert len(ps.fingerprint) == 64
    assert ps.fingerprint == load_prompts(path).fingerprint  # depends on the kept prompts only
    assert ps.fingerprint != load_prompts(path, template="a {}").fingerprint
    assert ps.fingerprint != load_prompts(path, dedupe=False).fingerprint


def test_animals_and_registry():
    ps = load_prompts("animals", "A painting of a {}")  # the old call form
    assert len(ps) == 45 and ps[0] == "A painting of a cat" and ps.summary() == "prompts: 45 from animals"
    assert "animals" in P.prompt_set_names()

    @P.register_prompt_set("test_tiny")
    def tiny():
        return ["x", "y", "x", ""]

    try:
        ps = load_prompts("test_tiny")
        assert list(ps) == ["x", "y"] and ps.counts["duplicates"] == 1 and "test_tiny" in P.prompt_set_names()
        with pytest.raises(ValueError, match="already registered"):
            P.register_prompt_set("test_tiny")(lambda: ["z"])
    finally:
        del P.PROMPT_SETS["test_tiny"]


def test_epoch_prompts_is_gone():
    assert not hasattr(P, "epoch_prompts")


@pytest.mark.parametrize(
    "content, ext, match",
    [
        ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",,}\n', ".jsonl", r"prompts\.source.*bad\.jsonl.*line 3"),
        ('[{"prompt": "a"},\n oops]', ".json", r"prompts\.source.*bad\.json.*line 2"),
        ("", ".txt", r"prompts\.source.*bad\.txt.*no prompts"),
        ("\n  \n\n", ".txt", r"prompts\.source.*bad\.txt.*no prompts"),
        ("", ".csv", r"prompts\.source.*bad\.csv.*header"),
        ("prompt\n", ".csv", r"prompts\.source.*bad\.csv.*no prompts"),
        ("", ".json", r"prompts\.source.*bad\.json.*not valid JSON"),
        ('{"items": ["a"]}', ".json", r"bad\.json.*'prompts'.*items"),
        ('"a cat"', ".json", r"bad\.json.*list"),
        ("[null, 3]", ".json", r"bad\.json.*no prompts"),
        ("prompt,id\n", ".parquet", r"prompts\.source.*bad\.parquet.*cannot read"),
        ("id,text\n1,a\n", ".csv", r"prompts\.field.*bad\.csv.*'prompt'.*\['id', 'text'\]"),
        ('{"text": "a", "id": 1}\n', ".jsonl", r"prompts\.field.*bad\.jsonl.*'prompt'.*\['id', 'text'\]"),
    ],
)
def test_malformed_files(tmp_path, content, ext, match):
    path = tmp_path / f"bad{ext}"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_prompts(path)


def test_parquet_without_the_column_names_the_columns(tmp_path):
    path = tmp_path / "pick.parquet"
    pq.write_table(pa.table({"caption": ["a"], "best_image_uid": ["u"]}), path)
    with pytest.raises(ValueError, match=r"prompts\.field.*pick\.parquet.*'prompt'.*caption.*best_image_uid"):
        load_prompts(path)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = write(tmp_path, ".parquet", CLEAN)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"prompts\.parquet.*needs pyarrow"):
        load_prompts(path)


def test_unknown_source_and_bad_settings(tmp_path):
    for source in ["animalz", tmp_path / "missing.txt", tmp_path]:
        with pytest.raises(ValueError, match=r"prompts\.source.*animals.*\.txt.*\.jsonl.*\.json.*\.csv.*\.parquet"):
            load_prompts(source)
    (tmp_path / "p.yaml").write_text("a\n")
    with pytest.raises(ValueError, match="supported"):
        load_prompts(tmp_path / "p.yaml")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*cannot read"):
        load_prompts(tmp_path / "latin1.txt")
    for template in ["A painting", "{} and {}", "{{}}", "{x}", "{"]:
        with pytest.raises(ValueError, match=r"prompts\.template"):
            load_prompts("animals", template)
    with pytest.raises(ValueError, match=r"prompts\.over_length"):
        load_prompts("animals", over_length="cut")
    with pytest.raises(ValueError, match="together"):
        load_prompts("animals", token_lengths=fake_lengths)


# ---------------------------------------------------------------------------------------------- sampler

SIZES = [(45, 32), (45, 45), (45, 1), (7, 3), (10, 4), (13, 12), (100, 7), (5, 5)]


def test_sampler_deterministic_and_seeded():
    a, b = PromptSampler(45, 32, seed=3), PromptSampler(45, 32, seed=3)
    assert [a.indices(e) for e in range(6)] == [b.indices(e) for e in range(6)]
    assert a.indices(2) == a.indices(2) and a.indices(0) != a.indices(1)
    assert a.indices(0) != PromptSampler(45, 32, seed=4).indices(0)
    ps = load_prompts("animals")
    assert a.prompts(ps, 5) == [ps[i] for i in a.indices(5)]
    with pytest.raises(ValueError, match="45"):
        PromptSampler(44, 32, 0).prompts(ps, 0)


@pytest.mark.parametrize("num, n", SIZES)
def test_sampler_no_repeat_within_epoch_or_pass(num, n):
    s = PromptSampler(num, n, seed=11)
    assert not s.repeats_within_epoch and s.epochs_per_pass == num // n
    epochs = [s.indices(e) for e in range(3 * s.epochs_per_pass + 1)]
    for idx in epochs:
        assert len(idx) == n and len(set(idx)) == n and all(0 <= i < num for i in idx)
    for p in range(3):  # a pass is a slice of one permutation: nothing seen twice
        seen = [i for idx in epochs[p * s.epochs_per_pass : (p + 1) * s.epochs_per_pass] for i in idx]
        assert len(seen) == len(set(seen)) == s.epochs_per_pass * n
    k = s.epochs_per_pass  # the next pass is a fresh permutation, not a replay of the last one
    assert [i for idx in epochs[:k] for i in idx] != [i for idx in epochs[k : 2 * k] for i in idx]


@pytest.mark.parametrize("num, n", [(45, 36), (7, 6), (100, 96), (10, 12)])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_slices_disjoint(num, n, world):
    if n % world:
        with pytest.raises(ValueError, match="divisible"):
            rank_slice(n, 0, world)
        return
    s = PromptSampler(num, n, seed=0)
    for epoch in range(4):
        all_ids = s.indices(epoch)
        per_rank = [[all_ids[g] for g in rank_slice(n, r, world)] for r in range(world)]
        assert sorted(g for r in range(world) for g in rank_slice(n, r, world)) == list(range(n))
        for r in range(world):
            for q in range(r + 1, world):
                assert not set(per_rank[r]) & set(per_rank[q]) or s.repeats_within_epoch


@pytest.mark.parametrize("num, n", [(5, 12), (3, 4), (1, 3)])
def test_more_prompts_per_epoch_than_the_set(num, n):
    s = PromptSampler(num, n, seed=2)
    assert s.repeats_within_epoch and s.epochs_per_pass == 0
    idx = s.indices(0)
    assert len(idx) == n and sorted(idx[:num]) == list(range(num))  # whole permutations first
    counts = [idx.count(i) for i in range(num)]
    assert max(counts) <= -(-n // num) and min(counts) >= n // num
    assert idx == s.indices(0) and PromptSampler(num, n, seed=2).indices(1) == s.indices(1)


def test_state_dict_round_trip_and_mismatch():
    ps = load_prompts("animals", "A painting of a {}")
    s = PromptSampler.for_set(ps, 32, seed=5)
    state = json.loads(json.dumps(s.state_dict(7)))
    assert state == {"seed": 5, "num_prompts": 45, "per_epoch": 32, "fingerprint": ps.fingerprint, "next_epoch": 7}
    assert PromptSampler.for_set(load_prompts("animals", "A painting of a {}"), 32, 5).check_state(state) == 7
    assert "fingerprint" not in PromptSampler(45, 32, 5).state_dict(0)
    assert PromptSampler(45, 32, 5).check_state(state) == 7  # no fingerprint at hand: sizes compared only
    with pytest.raises(ValueError, match="different prompt set"):
        PromptSampler.for_set(load_prompts("animals", "A photo of a {}"), 32, 5).check_state(state)
    with pytest.raises(ValueError, match="different prompt set"):
        PromptSampler(44, 32, 5).check_state(state)
    with pytest.raises(ValueError, match=r"train\.prompts_per_epoch=32, now 16"):
        PromptSampler.for_set(ps, 16, 5).check_state(state)
    with pytest.raises(ValueError, match=r"train\.seed=5, now 6"):
        PromptSampler.for_set(ps, 32, 6).check_state(state)
    with pytest.raises(ValueError, match="not a prompt sampler state"):
        s.check_state({"seed": 5})


@pytest.mark.parametrize("args", [(0, 4, 0), (4, 0, 0), (4, 2, -1), (4, 2.0, 0), (4, True, 0)])
def test_sampler_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        PromptSampler(*args)


@pytest.mark.parametrize("num, n", [(45, 32), (10, 4), (7, 7), (5, 12), (3, 4)])
def test_sampler_matches_the_documented_stream(num, n):
    """Pass p is default_rng([seed, p]).permutation(num); epoch e is the (e % K)-th slice of pass e // K,
    or, when n > num, passes e*M .. e*M+M-1 concatenated and cut to n."""

    def perm(p):
        return np.random.default_rng([9, p]).permutation(num).tolist()

    s, k, m = PromptSampler(num, n, seed=9), num // n, -(-n // num)
    for e in range(5):
        want = perm(e // k)[(e % k) * n : (e % k + 1) * n] if k else sum((perm(e * m + j) for j in range(m)), [])[:n]
        assert s.indices(e) == want


def test_a_folder_reads_its_shards_in_name_order(tmp_path):
    shards = tmp_path / "pickapic"
    shards.mkdir()
    pq.write_table(pa.table({"caption": ["b cat", "a dog"]}), shards / "train-00001.parquet")
    pq.write_table(pa.table({"caption": ["c owl", "b cat"]}), shards / "train-00000.parquet")
    (shards / "README.md").write_text("not a prompt file")
    ps = load_prompts(shards, field="caption")
    assert list(ps) == ["c owl", "b cat", "a dog"] and ps.counts["duplicates"] == 1
