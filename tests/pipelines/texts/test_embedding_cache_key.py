"""The text-embedding cache key: the texts and the weights' identity, never the checkpoint's path."""

from clipscope.pipelines.texts.embedding_cache import embeddings_key

TEXTS = ["a red circle", "a blue square"]


def test_a_checkpoint_moved_to_another_path_keeps_its_key():
    here = {"name": "clipscope-shapes", "pretrained": "/old/place/model.safetensors", "sha256": "ab" * 32}
    there = {**here, "pretrained": "/new/place/model.safetensors"}
    assert embeddings_key(TEXTS, here) == embeddings_key(TEXTS, there)


def test_other_weights_texts_or_tags_change_the_key():
    model = {"name": "clipscope-shapes", "pretrained": "/a/model.safetensors", "sha256": "ab" * 32}
    assert embeddings_key(TEXTS, model) != embeddings_key(TEXTS, {**model, "sha256": "cd" * 32})
    assert embeddings_key(TEXTS, model) != embeddings_key(TEXTS[::-1], model)
    tagged = {"name": "ViT-B-32", "pretrained": "openai"}  # no file: the tag is the identity
    assert embeddings_key(TEXTS, tagged) != embeddings_key(TEXTS, {**tagged, "pretrained": "laion2b_s34b_b79k"})
