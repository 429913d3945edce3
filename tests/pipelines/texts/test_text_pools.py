"""Text-pool registry: built-in pools, file pools, hashing, registration errors."""

import hashlib

import pytest

from clipscope.errors import ConfigError, DataError
from clipscope.pipelines.worlds.shapes import world as sw
from clipscope.pipelines.texts import pools as tp
from clipscope.pipelines.worlds.shapes import registry as shapes_registry
def reference_hash(texts):
    return hashlib.sha256(b"".join(t.encode("utf-8") + b"\0" for t in texts)).hexdigest()


def test_builtin_pools_are_listed():
    assert {"shapes-colours", "shapes-shapes", "shapes-positions", "shapes-sizes", "shapes-counts", "shapes-all",
            "wordfreq-en", "imagenet"} <= set(tp.list_pools())


def test_shapes_pools_hold_the_world_vocabulary():
    assert tp.get_pool("shapes-colours").texts == list(sw.COLOURS)
    assert tp.get_pool("shapes-shapes").texts == list(sw.SHAPES)
    assert tp.get_pool("shapes-positions").texts == list(sw.POSITIONS)
    assert tp.get_pool("shapes-sizes").texts == ["small", "medium", "large"]
    assert tp.get_pool("shapes-counts").texts == ["one shape", "two shapes", "three shapes"]
    assert tp.get_pool("shapes-shapes", template="a {}").texts[0] == "a circle"
    everything = tp.get_pool("shapes-all")
    parts = [tp.get_pool(f"shapes-{a}").texts for a in ("colours", "shapes", "positions", "sizes", "counts")]
    assert everything.texts == sum(parts, []) + list(shapes_registry.SHAPES_DISTRACTORS)
    assert len(set(everything.texts)) == len(everything.texts)
    assert not set(shapes_registry.SHAPES_DISTRACTORS) & set(sum(parts, []))
    with pytest.raises(ConfigError, match="template"):
        tp.get_pool("shapes-colours", template="no slot")


def test_hash_is_sha256_of_the_texts_in_order():
    pool = tp.get_pool("shapes-colours")
    assert pool.hash == reference_hash(pool.texts) and len(pool) == 8
    assert tp.pool_hash(["ab", "c"]) != tp.pool_hash(["a", "bc"]) != tp.pool_hash(["c", "ab"])
    assert tp.get_pool("shapes-colours").hash == pool.hash


def test_wordfreq_pool_offline():
    pool = tp.get_pool("wordfreq-en", top_n=200)
    assert len(pool.texts) == 200 and pool.texts[0] == "the" and "and" in pool.texts[:10]
    assert pool.texts[:50] == tp.get_pool("wordfreq-en", top_n=50).texts
    with pytest.raises(ConfigError, match="top_n must be an integer ≥ 1, got 0"):
        tp.get_pool("wordfreq-en", top_n=0)


def test_imagenet_pool():
    names = tp.get_pool("imagenet").texts
    assert len(names) == 1000 and names[0] == "tench"
    simple = tp.get_pool("imagenet", templates="simple").texts
    assert len(simple) == 7000 and simple[0].endswith("tench.") and "tench" in simple[6]
    assert tp.get_pool("imagenet", template="a photo of a {}.").texts[1] == "a photo of a goldfish."
    assert len(tp.get_pool("imagenet", templates="openai").texts) == 80_000
    with pytest.raises(ConfigError, match="templates must be one of"):
        tp.get_pool("imagenet", templates="fancy")
    with pytest.raises(ConfigError, match="not both"):
        tp.get_pool("imagenet", templates="simple", template="{}")


def test_file_pool(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("a red thing  \n\n  \nPhoto of a dog\nünïcode\n", encoding="utf-8")
    pool = tp.get_pool(f"file:{path}")
    assert pool.texts == ["a red thing", "Photo of a dog", "ünïcode"] and pool.name == f"file:{path}"
    assert pool.hash == reference_hash(pool.texts)
    with pytest.raises(DataError, match="not found"):
        tp.get_pool(f"file:{tmp_path / 'missing.txt'}")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no non-empty lines"):
        tp.get_pool(f"file:{tmp_path / 'empty.txt'}")


def test_register_and_errors(monkeypatch):
    monkeypatch.setattr(tp, "_FACTORIES", dict(tp._FACTORIES))
    tp.register_pool("mine", lambda n=2: [f"text {i}" for i in range(n)])
    assert tp.get_pool("mine", n=3).texts == ["text 0", "text 1", "text 2"] and "mine" in tp.list_pools()
    with pytest.raises(ConfigError, match="already registered"):
        tp.register_pool("mine", lambda: ["x"])
    tp.register_pool("mine", lambda: ["x"], replace=True)
    assert tp.get_pool("mine").texts == ["x"]
    with pytest.raises(ConfigError, match="bad options"):
        tp.get_pool("mine", nope=1)
    with pytest.raises(ConfigError, match="unknown text pool 'nope'"):
        tp.get_pool("nope")
    with pytest.raises(ConfigError, match="file:"):
        tp.register_pool("file:x", lambda: ["x"])
    with pytest.raises(ConfigError, match="callable"):
        tp.register_pool("other", ["x"])
    tp.register_pool("blank", lambda: ["ok", " "])
    with pytest.raises(ConfigError, match="non-empty strings"):
        tp.get_pool("blank")
