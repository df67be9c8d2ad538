"""Prompt sets, their loaders, and the deterministic per-epoch prompt draw.

A prompt set is a named set (the registry below: "animals" holds the 45 animals of DDPO / PRDP's
small-scale experiments; `register_prompt_set` adds more) or a local .txt, .jsonl, .json, .csv or .parquet
file, or a folder of them, the prompt read from the `field` column or key. Loading finds every problem at
start: empty, invalid, duplicate (with `dedupe`) and over-length entries are counted (read = empty + invalid
+ duplicates + dropped + kept), the template is applied, and prompts longer than the text encoder's context
are kept (the encoder truncates them, as SD does) or dropped. A file that cannot be read, is malformed,
lacks the field or leaves no prompt is a ValueError naming the file and the config key to fix. Formats and
options: docs/prompts.md.

The draw: pass p is the permutation of the set drawn by numpy's default_rng([seed, p]); with N prompts per
epoch and K = num_prompts // N epochs per pass, epoch e takes the slice [(e % K) * N, (e % K + 1) * N) of
pass e // K (the num_prompts % N prompts left at a pass's end are skipped). The epoch's list is a pure
function of (seed, epoch): every rank takes its own disjoint slice (`rank_slice`), no prompt repeats within
an epoch or a pass, and resuming needs only the epoch number (`state_dict` records (seed, size, fingerprint,
N); `check_state` refuses to resume when they changed). When N exceeds the set's size, epoch e concatenates
passes e*M .. e*M+M-1 (M = ceil(N / num_prompts)) cut to N, so prompts repeat within the epoch
(`repeats_within_epoch`).
"""

import csv
import dataclasses
import hashlib
import importlib
import io
import json
from pathlib import Path

import numpy as np

from prdp_ds.config import has_one_field

ANIMALS = [
    "cat",
    "dog",
    "horse",
    "monkey",
    "rabbit",
    "zebra",
    "spider",
    "bird",
    "sheep",
    "deer",
    "cow",
    "goat",
    "lion",
    "tiger",
    "bear",
    "raccoon",
    "fox",
    "wolf",
    "lizard",
    "beetle",
    "ant",
    "butterfly",
    "fish",
    "shark",
    "whale",
    "dolphin",
    "squirrel",
    "mouse",
    "rat",
    "snake",
    "turtle",
    "frog",
    "chicken",
    "duck",
    "goose",
    "bee",
    "pig",
    "turkey",
    "fly",
    "llama",
    "camel",
    "bat",
    "gorilla",
    "hedgehog",
    "kangaroo",
]

PROMPT_SETS = {}  # name -> zero-argument function returning the set's raw prompts

# Named sets defined in other modules: name -> "module:function", imported the first time the name is
# used (this module imports none of them).
BUILTIN_PROMPT_SETS = {
    "world_small": "prdp_ds.world.scenes:world_small_prompts",
    "world_large": "prdp_ds.world.scenes:world_large_prompts",
    "world_seen": "prdp_ds.world.scenes:world_seen_prompts",
    "world_demo": "prdp_ds.world.scenes:world_demo_prompts",
    "world_unseen": "prdp_ds.world.scenes:world_unseen_prompts",
}


def _prompt_set(name):
    """The function of the named set `name` (a built-in's module is imported on first use), or None."""
    if name not in PROMPT_SETS and name in BUILTIN_PROMPT_SETS:
        module, _, attr = BUILTIN_PROMPT_SETS[name].partition(":")
        PROMPT_SETS[name] = getattr(importlib.import_module(module), attr)
    return PROMPT_SETS.get(name)


def register_prompt_set(name):
    """Decorator registering a zero-argument function that returns a named set's raw prompts."""

    def register(fn):
        if _prompt_set(name) not in (None, fn):
            raise ValueError(f"prompt set {name!r} is already registered")
        PROMPT_SETS[name] = fn
        return fn

    return register


def prompt_set_names():
    return sorted(PROMPT_SETS.keys() | BUILTIN_PROMPT_SETS.keys())


register_prompt_set("animals")(lambda: ANIMALS)


@dataclasses.dataclass
class PromptSet:
    """The kept, templated prompts of a source with the cleaning counts; behaves as a sequence of strings."""

    prompts: tuple = dataclasses.field(repr=False)
    source: str
    counts: dict
    max_tokens: int = None
    over_length: str = "truncate"
    fingerprint: str = dataclasses.field(init=False)

    def __post_init__(self):  # the fingerprint lets a resumed run check it has the checkpoint's prompt set
        self.prompts = tuple(self.prompts)
        self.fingerprint = hashlib.sha256(json.dumps(self.prompts, ensure_ascii=False).encode()).hexdigest()

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return self.prompts[i]

    def __iter__(self):
        return iter(self.prompts)

    def summary(self):
        """One line: 'prompts: 1,234 from hpdv2.json (3 empty, 12 duplicates skipped, 5 over 77 tokens truncated)'."""
        c = self.counts
        skipped = [f"{c[k]:,} {k}" for k in ("empty", "invalid", "duplicates") if c[k]]
        notes = [", ".join(skipped) + " skipped"] if skipped else []
        if c["over_length"]:
            action = "dropped" if self.over_length == "drop" else "truncated"
            notes.append(f"{c['over_length']:,} over {self.max_tokens} tokens {action}")
        name = self.source if self.source in prompt_set_names() else Path(self.source).name
        return f"prompts: {len(self):,} from {name}" + (f" ({', '.join(notes)})" if notes else "")


def _error(path, message, key="source"):
    return ValueError(f"prompts.{key}: {path}: {message}")


def _read_text(path):
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise _error(path, f"cannot read the prompt file ({err})") from None


def _field_values(records, field, path):
    """Strings pass through, objects give their `field` (None when absent: invalid), anything else is invalid."""
    values, keys, found = [], set(), False
    for record in records:
        if isinstance(record, dict):
            keys.update(record)
            found = found or field in record
            record = record.get(field)
        values.append(record)
    if keys and not found:
        raise _error(path, f"no object has the field {field!r}; keys found: {sorted(keys)}", key="field")
    return values


def _read_jsonl(path, field):
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        try:
            records.append(json.loads(line) if line.strip() else "")
        except json.JSONDecodeError as err:
            raise _error(path, f"line {number} is not valid JSON ({err.msg})") from None
    return _field_values(records, field, path)


def _read_json(path, field):
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise _error(path, f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if isinstance(data, dict):
        if not isinstance(data.get("prompts"), list):
            raise _error(path, f"a JSON object must hold a list under 'prompts'; keys found: {sorted(data)}")
        data = data["prompts"]
    if not isinstance(data, list):
        raise _error(path, f"expected a list of strings or objects, got a JSON {type(data).__name__}")
    return _field_values(data, field, path)


def _read_csv(path, field):
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        if reader.fieldnames is None:
            raise _error(path, "empty CSV file (a header row naming the columns is expected)")
        if field not in reader.fieldnames:
            raise _error(path, f"no column {field!r}; columns found: {reader.fieldnames}", key="field")
        return [row[field] for row in reader]
    except csv.Error as err:
        raise _error(path, f"malformed CSV at line {reader.line_num} ({err})") from None


def _read_parquet(path, field):
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise _error(path, "reading .parquet prompt files needs pyarrow (pip install pyarrow)") from None
    try:
        columns = pq.read_schema(path).names
        if field in columns:
            return pq.read_table(path, columns=[field]).column(field).to_pylist()
    except (OSError, pyarrow.ArrowException) as err:
        raise _error(path, f"cannot read the parquet file ({err})") from None
    raise _error(path, f"no column {field!r}; columns found: {columns}", key="field")


READERS = {
    ".txt": lambda path, field: _read_text(path).splitlines(),
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def load_prompts(
    source, template="{}", field="prompt", dedupe=True, over_length="truncate", token_lengths=None, max_tokens=None
):
    """A named set or a local prompt file -> PromptSet of cleaned, templated prompts (see the module doc).

    token_lengths: list[str] -> list[int], each prompt's token count with BOS/EOS; prompts over
    max_tokens are kept ('truncate') or dropped ('drop') as over_length says.
    """
    if not has_one_field(template):
        raise ValueError(f"prompts.template must contain '{{}}' as its only replacement field, got {template!r}")
    if over_length not in ("truncate", "drop"):
        raise ValueError(f"prompts.over_length must be 'truncate' or 'drop', got {over_length!r}")
    if (token_lengths is None) != (max_tokens is None):
        raise ValueError("load_prompts: token_lengths and max_tokens go together")
    source = str(source)
    named = _prompt_set(source)
    if named is not None:
        entries = list(named())
    else:
        path = Path(source)
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in READERS) if path.is_dir() else [path]
        if not files or not all(f.is_file() and f.suffix.lower() in READERS for f in files):
            raise ValueError(
                f"prompts.source={source!r} is neither a named prompt set "
                f"({', '.join(prompt_set_names())}) nor an existing prompt file of a supported type "
                f"({', '.join(READERS)}) or a folder holding such files"
            )
        entries = [e for f in files for e in READERS[f.suffix.lower()](f, field)]
    counts = dict.fromkeys(("read", "empty", "invalid", "duplicates", "over_length", "dropped", "kept"), 0)
    counts["read"], seen, kept = len(entries), set(), []
    for entry in entries:
        text = entry.strip() if isinstance(entry, str) else None
        if text is None:
            counts["invalid"] += 1
        elif not text:
            counts["empty"] += 1
        elif dedupe and text in seen:
            counts["duplicates"] += 1
        else:
            seen.add(text)
            kept.append(template.format(text))
    if token_lengths is not None and kept:
        lengths = list(token_lengths(kept))
        if len(lengths) != len(kept):
            raise ValueError(f"token_lengths returned {len(lengths)} lengths for {len(kept)} prompts")
        long = [n > max_tokens for n in lengths]
        counts["over_length"] = sum(long)
        if over_length == "drop":
            kept, counts["dropped"] = [p for p, too_long in zip(kept, long) if not too_long], counts["over_length"]
    counts["kept"] = len(kept)
    if not kept:
        raise _error(source, f"no prompts left (counts: {counts}; prompts.field={field!r})")
    return PromptSet(kept, source, counts, max_tokens, over_length)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class PromptSampler:
    """The epoch's global list of `per_epoch` prompt indices, a pure function of (seed, epoch) (module doc)."""

    def __init__(self, num_prompts, per_epoch, seed, fingerprint=None):
        self.num_prompts = _check_int("the prompt set's size", num_prompts, 1)
        self.per_epoch = _check_int("train.prompts_per_epoch", per_epoch, 1)
        self.seed = _check_int("train.seed", seed, 0)
        self.fingerprint = fingerprint

    @classmethod
    def for_set(cls, prompt_set, per_epoch, seed):
        return cls(len(prompt_set), per_epoch, seed, prompt_set.fingerprint)

    @property
    def epochs_per_pass(self):
        """Whole epochs drawn from one permutation; 0 when an epoch needs more than the whole set."""
        return self.num_prompts // self.per_epoch

    @property
    def repeats_within_epoch(self):
        return self.per_epoch > self.num_prompts

    def _permutation(self, p):
        return np.random.default_rng([self.seed, p]).permutation(self.num_prompts)

    def indices(self, epoch):
        epoch, k = _check_int("epoch", epoch, 0), self.epochs_per_pass
        if k:
            start = (epoch % k) * self.per_epoch
            return self._permutation(epoch // k)[start : start + self.per_epoch].tolist()
        m = -(-self.per_epoch // self.num_prompts)
        return np.concatenate([self._permutation(epoch * m + j) for j in range(m)])[: self.per_epoch].tolist()

    def prompts(self, prompt_set, epoch):
        if len(prompt_set) != self.num_prompts:
            raise ValueError(f"the sampler was built for {self.num_prompts} prompts, the set has {len(prompt_set)}")
        return [prompt_set[i] for i in self.indices(epoch)]

    def state_dict(self, epoch):
        """JSON-able state for a checkpoint; `epoch` is the next epoch to draw (where training resumes)."""
        state = {
            "seed": self.seed,
            "num_prompts": self.num_prompts,
            "per_epoch": self.per_epoch,
            "next_epoch": _check_int("epoch", epoch, 0),
        }
        if self.fingerprint is not None:
            state["fingerprint"] = self.fingerprint
        return state

    def check_state(self, state):
        """Check a saved state_dict against this sampler -> the epoch to resume at; ValueError on a mismatch."""
        try:
            seed, num, per_epoch, epoch = (state[k] for k in ("seed", "num_prompts", "per_epoch", "next_epoch"))
        except (KeyError, TypeError):
            raise ValueError(f"not a prompt sampler state: {state!r}") from None
        saved_fp = state.get("fingerprint")
        if num != self.num_prompts or (saved_fp and self.fingerprint and saved_fp != self.fingerprint):
            raise ValueError(
                f"the checkpoint was made with a different prompt set ({num} prompts, fingerprint "
                f"{str(saved_fp)[:12]}) than the current prompts.* settings give ({self.num_prompts} prompts, "
                f"fingerprint {str(self.fingerprint)[:12]}); resume with the same prompts.source, template, field, "
                f"dedupe and over_length, or start a new run"
            )
        for key, saved, now in (
            ("train.prompts_per_epoch", per_epoch, self.per_epoch),
            ("train.seed", seed, self.seed),
        ):
            if saved != now:
                raise ValueError(
                    f"the checkpoint was made with {key}={saved}, now {now}: the prompt order would "
                    f"change on resume; restore {key}={saved} or start a new run"
                )
        return epoch


def rank_slice(num_groups, rank, world_size):
    """The global group ids this rank owns (contiguous, equal shares)."""
    if num_groups % world_size:
        raise ValueError(f"train.prompts_per_epoch={num_groups} must be divisible by the world size {world_size}")
    per_rank = num_groups // world_size
    return list(range(rank * per_rank, (rank + 1) * per_rank))
