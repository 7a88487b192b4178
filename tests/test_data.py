"""The prepare stage: counts, disjointness, scored spans, determinism, bad corpora."""

import filecmp
import json

import pytest

from conftest import cli, smoke_config
from unlearnbench.data.corpora import clean_unique, kjv_passages, load_texts, pydoc_paragraphs, stdlib_docstrings
from unlearnbench.data.build import build_data, load_examples, load_tokenizer
from unlearnbench.errors import UserError


def test_builtin_corpora():
    kjv = kjv_passages()
    assert len(kjv) == 24408
    assert kjv[0].startswith("In the beginning") and not kjv[0][0].isdigit()
    docs = pydoc_paragraphs()
    assert len(docs) > 1000 and any("assert" in d for d in docs)


def test_stdlib_docstrings_by_hand(tmp_path):
    """Module, class and function docstrings, paragraph by paragraph, files in sorted order; tests, site-packages
    and files this Python cannot parse are left out."""
    (tmp_path / "b.py").write_text('"""Second module."""\n')
    (tmp_path / "a.py").write_text('"""First   module.\n\nIts second\n  paragraph."""\n'
                                   'class C:\n    """A class."""\n    def f(self):\n        """A method."""\n')
    for skipped in ("test", "site-packages"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "x.py").write_text('"""Not documentation."""\n')
    (tmp_path / "bad.py").write_text("def broken(:\n")
    assert stdlib_docstrings(tmp_path) == ["First module.", "Its second paragraph.", "A class.", "A method.",
                                           "Second module."]
    with pytest.raises(UserError, match="pystdlib"):
        stdlib_docstrings(tmp_path / "missing")


def test_stdlib_corpus_is_large_and_deterministic():
    texts = clean_unique(load_texts("pystdlib"), 40)
    assert len(texts) > 6000  # more than the default design needs for an ID corpus (~5,000 passages)
    assert texts == clean_unique(stdlib_docstrings(), 40)


def test_counts_match_config(prepared):
    cfg, run_dir = prepared
    ds = load_examples(run_dir / "data").to_pandas()
    d = cfg.data
    for kind in d.kinds:
        for r in d.repetitions:
            assert ((ds.kind == kind) & (ds.repetitions == r) & (ds.split == "forget")).sum() == d.group_size
    assert ((ds.kind == "canary") & (ds.split == "reference")).sum() == d.n_references
    assert ((ds.kind == "id") & (ds.split == "reference")).sum() == d.n_id_references
    assert ((ds.kind == "domain") & (ds.split == "reference")).sum() == d.n_domain_references
    assert ((ds.kind == "id") & (ds.split == "holdout")).sum() == d.n_holdout
    assert (ds.split == "retain").sum() == d.n_retain
    assert ds.split.isin(["train", "retain"]).sum() == d.n_train
    assert ds.example_id.is_unique
    man = json.loads((run_dir / "data" / "manifest.json").read_text())
    reps = sum(d.group_size * r for r in d.repetitions) * len(d.kinds)
    assert man["training_mixture"]["original"]["sequences"] == d.n_train + reps
    assert man["training_mixture"]["oracle"]["sequences"] == d.n_train


def test_nothing_held_out_is_trained_on(prepared):
    _, run_dir = prepared
    ds = load_examples(run_dir / "data").to_pandas()
    trained = set(ds[ds.in_original].text) | set(ds[ds.in_oracle].text)
    held = ds[ds.split.isin(["reference", "holdout"])]
    assert not (set(held.text) & trained)
    # the oracle never sees a forget example; the original sees all of them
    assert not ds[ds.split == "forget"].in_oracle.any() and ds[ds.split == "forget"].in_original.all()
    # no canary secret of the references appears in a trained canary
    canaries = ds[ds.kind == "canary"]
    assert not set(canaries[canaries.split == "reference"].text) & set(canaries[canaries.split == "forget"].text)


def test_canary_span_is_the_secret_only(prepared):
    cfg, run_dir = prepared
    ds = load_examples(run_dir / "data")
    tok = load_tokenizer(run_dir / "data")
    for row in ds.filter(lambda r: r["kind"] == "canary").select(range(20)):
        scored = tok.decode(row["input_ids"][row["score_start"]:row["score_end"]])
        prefix = tok.decode(row["input_ids"][1:row["score_start"]])
        assert prefix == cfg.data.canary_prefix
        assert scored == row["text"][len(cfg.data.canary_prefix):]
        assert len(scored) == cfg.data.canary_secret_length
    for row in ds.filter(lambda r: r["kind"] == "id").select(range(5)):
        assert row["score_start"] == 1 and row["score_end"] == len(row["input_ids"])
        assert row["input_ids"][0] == tok.bos_token_id


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    small = ["data.n_train=200", "data.n_retain=20", "data.n_holdout=20", "data.n_id_references=30",
             "data.n_references=30", "data.n_domain_references=20", "data.n_domain_holdout=10", "data.group_size=4"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_data(smoke_config(a, *small), a / "data")
    build_data(smoke_config(b, *small), b / "data")
    build_data(smoke_config(c, *small, "run.seed=1"), c / "data")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    assert not filecmp.cmp(a / "data/examples/data-00000-of-00001.arrow", c / "data/examples/data-00000-of-00001.arrow",
                           shallow=False)


def test_local_files_as_corpus(tmp_path):
    texts = [f"Passage number {i} says something about the weather and the sea." for i in range(50)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    (tmp_path / "c.txt").write_text("\n".join(texts))
    import pandas as pd

    pd.DataFrame({"body": texts}).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "c.csv", index=False)
    assert load_texts(str(tmp_path / "c.jsonl")) == texts
    assert load_texts(str(tmp_path / "c.txt")) == texts
    assert load_texts(str(tmp_path / "c.parquet"), text_field="body") == texts
    assert load_texts(str(tmp_path / "c.csv")) == texts


def test_json_corpora_in_every_shape_datasets_reads(tmp_path):
    """.json: a list of objects, an object of columns, or JSON lines under a .json name, read with Python's json
    (pyarrow's JSON reader, behind `datasets`, crashed the process on a generated file); a non-string value is not
    text; a document of another shape or one without the field is refused naming the fix."""
    texts = [f"Passage {i} é" for i in range(5)]
    cases = {"records.json": json.dumps([{"text": t, "n": i} for i, t in enumerate(texts)]),
             "columns.json": json.dumps({"text": texts, "n": list(range(5))}),
             "lines.json": "\n".join(json.dumps({"text": t}) for t in texts) + "\n\n",
             "mixed.jsonl": "\n".join(json.dumps({"text": t}) for t in texts) + '\n{"text": 3}\n'}
    for name, body in cases.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
        assert load_texts(str(tmp_path / name)) == texts, name
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "x"}]).encode())
    assert load_texts(str(tmp_path / "bom.json")) == ["x"]
    for body, match in [('"just a string"', "neither a list of objects"), ('[1, 2]', "neither a list of objects"),
                        ('{"data": ["a"]}', "neither a list of objects"), ('[{"body": "a"}]', "no field 'text'"),
                        ('[{"text": 1}]', "no text in field"), ('[]', "no rows"), ('{"text": 1', "line 1")]:
        (tmp_path / "bad.json").write_text(body)
        with pytest.raises(UserError, match=match):
            load_texts(str(tmp_path / "bad.json"))
    (tmp_path / "latin.json").write_bytes(json.dumps([{"text": "é"}], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_texts(str(tmp_path / "latin.json"))


def test_bad_corpora(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(UserError, match="line 2"):
        load_texts(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        load_texts(str(empty))
    with pytest.raises(UserError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="text_field"):
        load_texts(str(nofield))


def test_corpus_too_small_is_refused_and_nothing_written(tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(json.dumps({"text": f"a short passage of text, number {i}, long enough to keep"})
                               for i in range(40)))
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="too small"):
        build_data(smoke_config(run_dir, f"data.corpus={small}"), run_dir / "data")
    assert not (run_dir / "data").exists()


def test_cli_bad_input_exits_cleanly(tmp_path):
    res = cli("prepare", "--preset", "smoke", f"run.dir={tmp_path / 'r'}", "data.corpus=/no/such/file.jsonl")
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r" / "data").exists()
    res = cli("prepare", "--preset", "nope")
    assert res.returncode == 2 and "Unknown preset" in res.stderr


def test_replicate_groups_are_disjoint_and_trained_as_often_as_their_repetitions(tmp_path):
    """data.replicates=3: three disjoint forget groups per (kind, repetitions), ids carry the group, every group is
    in the original's mixture `repetitions` times and never in the oracle's; requests follow the groups."""
    import collections

    from unlearnbench.stages.train import mixture
    from unlearnbench.stages.unlearn import build_requests

    small = ["data.n_train=200", "data.n_retain=20", "data.n_holdout=20", "data.n_id_references=30",
             "data.n_references=30", "data.n_domain_references=20", "data.n_domain_holdout=10", "data.group_size=4",
             "data.replicates=3"]
    cfg = smoke_config(tmp_path, *small)
    build_data(cfg, tmp_path / "data")
    ds = load_examples(tmp_path / "data")
    forget = ds.filter(lambda r: r["split"] == "forget").to_pandas()
    sizes = forget.groupby(["kind", "repetitions", "group"]).size()
    assert len(sizes) == 3 * 3 * 3 and (sizes == 4).all()
    assert forget.text.is_unique  # disjoint: no passage or secret in two groups
    assert set(forget[forget.group == 2].example_id.str.slice(0, 13)) >= {"id-r016-g2-00"}
    counts = collections.Counter(mixture(ds, "original"))
    rows = {e: i for i, e in enumerate(ds["example_id"])}
    assert all(counts[rows[e]] == r for e, r in zip(forget.example_id, forget.repetitions))
    assert not set(rows[e] for e in forget.example_id) & set(mixture(ds, "oracle"))
    reqs = build_requests(cfg, forget)
    assert len(reqs) == 27 and {r.name for r in reqs} >= {"canary_r4_g0", "domain_r16_g2"}
    assert all(len(r.example_ids) == 4 and r.group in (0, 1, 2) for r in reqs)


def test_bos_has_its_own_trainable_embedding_and_padding_is_separate(prepared):
    """BOS (id 0) starts every example and its input embedding learns; padding (id 1) never appears in an
    example, and the model's padding_idx keeps its row at zero with no gradient."""
    import dataclasses


    from unlearnbench.batching import collate
    from unlearnbench.models import build_model

    cfg, run_dir = prepared
    tok = load_tokenizer(run_dir / "data")
    assert (tok.bos_token_id, tok.pad_token_id) == (0, 1)
    ds = load_examples(run_dir / "data")
    ids = ds["input_ids"]
    assert all(x[0] == 0 for x in ids) and not any(1 in x for x in ids)
    untied = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tie_embeddings=False))
    model = build_model(untied, len(tok), 0, tok.bos_token_id, tok.pad_token_id)
    emb = model.get_input_embeddings()
    assert emb.padding_idx == 1 and float(emb.weight.detach()[1].abs().sum()) == 0.0
    seqs = [ids[0], ids[1][:5]]  # two lengths: the short one is padded with id 1
    b = collate(seqs, [1, 1], [len(s) for s in seqs], tok.pad_token_id)
    assert int((b["input_ids"] == 1).sum()) == len(seqs[0]) - 5
    model(**b).loss.backward()
    assert float(emb.weight.grad[0].abs().sum()) > 0  # BOS learns from the input side
    assert float(emb.weight.grad[1].abs().sum()) == 0.0  # padding does not
    with pytest.raises(ValueError, match="BOS and padding share"):
        build_model(untied, len(tok), 0, 0, 0)
