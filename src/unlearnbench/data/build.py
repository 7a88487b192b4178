"""Every data set of the study, tokenized, with stable ids and scored spans (the prepare stage writes them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from unlearnbench.config import Config
from unlearnbench.data.corpora import clean_unique, load_texts, python_version
from unlearnbench.errors import UserError
from unlearnbench.io import atomic_dir, write_json

COLUMNS = ("example_id", "kind", "repetitions", "group", "split", "text", "input_ids", "score_start", "score_end",
           "in_original", "in_oracle")
BOS = "<|endoftext|>"
PAD = "<|pad|>"
# The built-in tokenizer's special tokens and their ids: BOS (also EOS) is 0 and has a trainable embedding; padding
# is 1, its own id, which the model's `padding_idx` freezes and which is never attended to or scored.
SPECIAL_TOKENS = (BOS, PAD)
BOS_ID, PAD_ID = 0, 1


def _take(pool: list[str], n: int, what: str, key: str, available_msg: str) -> list[str]:
    if len(pool) < n:
        raise UserError(f"The corpus is too small for {what}: {n} needed ({key}), {len(pool)} left "
                        f"{available_msg}. Lower {key} or use a larger corpus.")
    out = pool[:n]
    del pool[:n]
    return out


def _load_corpus(source: str, field: str, split: str = "train", config: str | None = None,
                 cache: str | None = None) -> list[str]:
    """`load_texts`, with a corpus file that is not UTF-8 reported as bad input (not a traceback)."""
    try:
        return load_texts(source, field, split, config, cache)
    except UnicodeDecodeError as exc:
        raise UserError(f"Corpus file '{source}' is not UTF-8 text (byte {exc.start}: {exc.reason}). Convert it "
                        "to UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`) or point the corpus at another file."
                        ) from None


def build_texts(cfg: Config) -> list[dict]:
    """Rows (without tokens) of every set: train pool, retain, forget groups, references, holdouts."""
    d = cfg.data
    rng = np.random.default_rng(cfg.run.seed)
    rows: list[dict] = []

    def add(eid, kind, reps, split, text, secret=None, trained=(False, False), group=0):
        rows.append({"example_id": eid, "kind": kind, "repetitions": reps, "group": group, "split": split,
                     "text": text, "secret": secret, "in_original": trained[0], "in_oracle": trained[1]})

    n_rep = d.replicates

    def forget_groups(texts: list[str]):
        """(example id suffix, repetitions, replicate group, text) of every forget example of one kind: for each
        repetitions count, `data.replicates` disjoint groups of `data.group_size`."""
        for r_idx, reps in enumerate(d.repetitions):
            for j in range(n_rep):
                g = r_idx * n_rep + j
                for i, t in enumerate(texts[g * d.group_size:(g + 1) * d.group_size]):
                    yield (f"r{reps:03d}-{i:04d}" if n_rep == 1 else f"r{reps:03d}-g{j}-{i:04d}"), reps, j, t

    cache = str(Path(cfg.run.dir) / ".cache" / "datasets") if cfg.run.dir else None
    id_texts = clean_unique(_load_corpus(d.corpus, d.text_field, d.corpus_split, d.corpus_config, cache),
                            d.min_chars)
    if not id_texts:
        raise UserError(f"Corpus '{d.corpus}' has no passage of at least data.min_chars={d.min_chars} characters.")
    domain_texts: list[str] = []
    if "domain" in d.kinds:
        id_set = set(id_texts)
        domain_texts = [t for t in clean_unique(_load_corpus(d.domain_corpus, d.text_field, cache=cache),
                                                   d.min_chars)
                        if t not in id_set]
    id_pool = [id_texts[i] for i in rng.permutation(len(id_texts))]
    msg = f"of {len(id_texts)} usable passages in '{d.corpus}'"
    n_groups = len(d.repetitions) * n_rep
    if "id" in d.kinds:
        forget = _take(id_pool, d.group_size * n_groups, "the ID forget groups", "data.group_size", msg)
        for suffix, reps, j, t in forget_groups(forget):
            add(f"id-{suffix}", "id", reps, "forget", t, trained=(True, False), group=j)
    for i, t in enumerate(_take(id_pool, d.n_id_references, "the ID references", "data.n_id_references", msg)):
        add(f"id-ref-{i:05d}", "id", 0, "reference", t)
    for i, t in enumerate(_take(id_pool, d.n_holdout, "the ID holdout", "data.n_holdout", msg)):
        add(f"id-holdout-{i:05d}", "id", 0, "holdout", t)
    train = _take(id_pool, d.n_train, "the train pool", "data.n_train", msg)
    retain_idx = set(rng.choice(len(train), size=d.n_retain, replace=False).tolist())
    for i, t in enumerate(train):
        split = "retain" if i in retain_idx else "train"
        add(f"id-{split}-{i:05d}", "id", 0, split, t, trained=(True, True))
    if "canary" in d.kinds:
        n_secrets = d.group_size * n_groups + d.n_references
        secrets = _secrets(rng, n_secrets, d.canary_alphabet, d.canary_secret_length)
        for suffix, reps, j, s in forget_groups(secrets[:d.group_size * n_groups]):
            add(f"canary-{suffix}", "canary", reps, "forget", d.canary_prefix + s, s, (True, False), group=j)
        for i, s in enumerate(secrets[d.group_size * n_groups:]):
            add(f"canary-ref-{i:05d}", "canary", 0, "reference", d.canary_prefix + s, s)
    if "domain" in d.kinds:
        pool = [domain_texts[i] for i in rng.permutation(len(domain_texts))]
        dmsg = f"of {len(domain_texts)} usable passages in '{d.domain_corpus}'"
        forget = _take(pool, d.group_size * n_groups, "the domain forget groups", "data.group_size", dmsg)
        for suffix, reps, j, t in forget_groups(forget):
            add(f"domain-{suffix}", "domain", reps, "forget", t, trained=(True, False), group=j)
        for i, t in enumerate(_take(pool, d.n_domain_references, "the domain references",
                                    "data.n_domain_references", dmsg)):
            add(f"domain-ref-{i:05d}", "domain", 0, "reference", t)
        for i, t in enumerate(_take(pool, d.n_domain_holdout, "the domain holdout", "data.n_domain_holdout", dmsg)):
            add(f"domain-holdout-{i:05d}", "domain", 0, "holdout", t)
    return rows


def _secrets(rng: np.random.Generator, n: int, alphabet: str, length: int) -> list[str]:
    symbols = np.array(sorted(set(alphabet)))
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = "".join(rng.choice(symbols, size=length))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on the training mixture, wrapped as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=BOS, eos_token=BOS, pad_token=PAD,
                                  unk_token=None)
    assert (tok.bos_token_id, tok.pad_token_id) == (BOS_ID, PAD_ID), "special tokens come first, in order"
    return tok


def load_pretrained_tokenizer(cfg: Config):
    """The pretrained model's own tokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:
        raise UserError(f"Could not load the tokenizer of model.name_or_path='{cfg.model.name_or_path}': "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Give a local "
                        "model directory or a hub name reachable from here.") from None
    if tok.pad_token is None:  # GPT-2, Llama: no pad token; padded positions are masked, any id will do
        tok.pad_token = tok.eos_token
    if tok.bos_token_id is None and tok.eos_token_id is None:
        raise UserError(f"The tokenizer of model.name_or_path='{cfg.model.name_or_path}' has neither a BOS nor an EOS "
                        "token: unlearnbench starts every example with one. Use a causal LM's own tokenizer.")
    return tok


def check_positions(cfg: Config) -> None:
    """A pretrained model must hold data.max_tokens + 1 positions (BOS + text): GPT-2 has `n_positions`, most others
    `max_position_embeddings`. Checked before anything is tokenized, rather than an index error in training."""
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:
        return  # load_pretrained says what is wrong with the model when it is loaded
    limit = next((getattr(mc, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(getattr(mc, k, None), int)), None)
    if limit is not None and cfg.data.max_tokens + 1 > limit:
        raise UserError(f"data.max_tokens={cfg.data.max_tokens} (+1 for the BOS token) does not fit the "
                        f"{limit} positions of model.name_or_path='{cfg.model.name_or_path}'. Set "
                        f"data.max_tokens={limit - 1} or lower.")


def tokenize_rows(rows: list[dict], tok, max_tokens: int) -> None:
    """Add input_ids and the scored span: [BOS] + text, scoring every token; canaries score the secret only."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else [tok.eos_token_id]
    prefix_cache: dict[str, list[int]] = {}
    for r in rows:
        if r["secret"] is not None:
            prefix = r["text"][: len(r["text"]) - len(r["secret"])]
            if prefix not in prefix_cache:
                prefix_cache[prefix] = tok.encode(prefix, add_special_tokens=False)
            secret_ids = tok.encode(r["secret"], add_special_tokens=False)
            ids = bos + prefix_cache[prefix] + secret_ids
            start = len(bos) + len(prefix_cache[prefix])
            if len(ids) > max_tokens + 1:
                raise UserError(f"A canary needs {len(ids)} tokens, more than data.max_tokens={max_tokens}. "
                                "Raise data.max_tokens or shorten the prefix.")
        else:
            ids = (bos + tok.encode(r["text"], add_special_tokens=False))[: max_tokens + 1]
            start = len(bos)
        r["input_ids"] = ids
        r["score_start"] = start
        r["score_end"] = len(ids)


def manifest(rows: list[dict], tok, cfg: Config) -> dict:
    """Counts per kind x repetitions x split, token counts and training-mixture sizes."""
    groups: dict[str, dict] = {}
    for r in rows:
        key = f"{r['kind']}/r{r['repetitions']}/{r['split']}"
        g = groups.setdefault(key, {"kind": r["kind"], "repetitions": r["repetitions"], "split": r["split"],
                                    "examples": 0, "tokens": 0, "scored_tokens": 0})
        g["examples"] += 1
        g["tokens"] += len(r["input_ids"])
        g["scored_tokens"] += r["score_end"] - r["score_start"]

    def mixture(flag):
        ex = [r for r in rows if r[flag]]
        reps = [max(1, r["repetitions"]) for r in ex]
        return {"unique_examples": len(ex), "sequences": int(sum(reps)),
                "tokens": int(sum(len(r["input_ids"]) * k for r, k in zip(ex, reps)))}

    return {"groups": sorted(groups.values(), key=lambda g: (g["kind"], g["split"], g["repetitions"])),
            "total_examples": len(rows), "vocab_size": len(tok),
            "tokenizer": cfg.model.name_or_path or f"byte-level BPE ({cfg.data.vocab_size})",
            # the built-in Python corpora (pydoc, pystdlib) are read from the running interpreter
            "corpora": {"id": cfg.data.corpus, "domain": cfg.data.domain_corpus, "python": python_version()},
            "training_mixture": {"original": mixture("in_original"), "oracle": mixture("in_oracle")}}


def build_data(cfg: Config, data_dir: Path) -> dict:
    """Build, tokenize and write every data set to `data_dir` (atomically). Returns the manifest."""
    import datasets

    datasets.disable_progress_bars()
    if cfg.model.name_or_path:
        check_positions(cfg)
    rows = build_texts(cfg)
    if cfg.model.name_or_path:
        tok = load_pretrained_tokenizer(cfg)
    else:
        mixture = [r["text"] for r in rows if r["in_original"]]
        tok = train_tokenizer(mixture, cfg.data.vocab_size)
    tokenize_rows(rows, tok, cfg.data.max_tokens)
    man = manifest(rows, tok, cfg)
    table = {c: [r[c] for r in rows] for c in COLUMNS}
    ds = datasets.Dataset.from_dict(table, features=datasets.Features({
        "example_id": datasets.Value("string"), "kind": datasets.Value("string"),
        "repetitions": datasets.Value("int32"), "group": datasets.Value("int32"), "split": datasets.Value("string"), "text": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")), "score_start": datasets.Value("int32"),
        "score_end": datasets.Value("int32"), "in_original": datasets.Value("bool"),
        "in_oracle": datasets.Value("bool")}))
    # A content hash instead of datasets' random fingerprint, so the same seed writes identical files.
    ds._fingerprint = hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:16]
    with atomic_dir(data_dir) as tmp:
        ds.save_to_disk(str(tmp / "examples"))
        tok.save_pretrained(str(tmp / "tokenizer"))
        write_json(tmp / "manifest.json", man)
    return man


def load_examples(data_dir: Path):
    """The prepared examples as a `datasets.Dataset`, checked against the prepare stage's record first."""
    import datasets

    from unlearnbench.records import verify_input
    from unlearnbench.io import CorruptFileError

    path = Path(data_dir) / "examples"
    if not path.exists():
        raise UserError(f"No prepared data at {path}. Run `unlearnbench prepare` (or `run`) first.")
    verify_input(path)
    try:
        return datasets.load_from_disk(str(path))
    except Exception as exc:  # an Arrow file or state json that is damaged in a way no record covers
        raise CorruptFileError(f"The prepared data at {path} cannot be read ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]}). Rerun `unlearnbench prepare --force` with the "
                               "same config to rebuild it.") from None


def load_tokenizer(data_dir: Path):
    """The tokenizer written by prepare, checked against the prepare stage's record first."""
    from transformers import AutoTokenizer

    from unlearnbench.records import verify_input
    from unlearnbench.io import CorruptFileError

    path = Path(data_dir) / "tokenizer"
    verify_input(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CorruptFileError(f"The tokenizer at {path} cannot be read ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]}). Rerun `unlearnbench prepare --force` with the "
                               "same config to rebuild it.") from None
