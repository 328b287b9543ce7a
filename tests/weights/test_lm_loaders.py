"""LM loaders on bad files: every problem is a ModelFileError naming the file or tensor."""

import json

import pytest

pytest.importorskip("transformers")

from tiny_llama import tiny_hf_model, write_gguf  # noqa: E402

from edge_mmm.errors import ModelFileError  # noqa: E402
from edge_mmm.models.llama import build_llama  # noqa: E402
from edge_mmm.weights.gguf_lm import load_gguf_lm  # noqa: E402
from edge_mmm.weights.hf_lm import load_hf_lm  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model("llama")


@pytest.fixture
def gguf_file(tmp_path, hf_model):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf_model, qtype="Q4_1")
    return path


@pytest.fixture
def hf_dir(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_truncated_gguf(gguf_file):
    data = gguf_file.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 7):
        gguf_file.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="tiny.gguf"):
            load_gguf_lm(gguf_file)


def test_corrupt_gguf(gguf_file):
    gguf_file.write_bytes(b"NOTAGGUF" + bytes(range(256)) * 8)
    with pytest.raises(ModelFileError, match="tiny.gguf"):
        load_gguf_lm(gguf_file)


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_gguf_lm(tmp_path / "nope.gguf")


def test_unsupported_quant_type(tmp_path, hf_model):
    path = tmp_path / "q5.gguf"
    write_gguf(path, hf_model, qtype="Q5_0")
    with pytest.raises(ModelFileError, match=r"tensor token_embd\.weight has quantization type Q5_0"):
        load_gguf_lm(path)


def test_gguf_metadata_shape_mismatch(tmp_path, hf_model):
    path = tmp_path / "bad.gguf"
    write_gguf(path, hf_model, overrides={"llama.feed_forward_length": 96})
    with pytest.raises(ModelFileError, match="ffn|mlp"):
        load_gguf_lm(path)


def test_gguf_unsupported_arch(tmp_path, hf_model):
    path = tmp_path / "arch.gguf"
    write_gguf(path, hf_model, arch="llama")
    data = path.read_bytes().replace(b"llama", b"gpt9x", 1)  # general.architecture value
    path.write_bytes(data)
    with pytest.raises(ModelFileError):
        load_gguf_lm(path)


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    for cut in (4, 100, len(data) - 16):
        f.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="model.safetensors"):
            load_hf_lm(hf_dir)


def test_corrupt_safetensors_header(hf_dir):
    f = hf_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_hf_lm(hf_dir)


def test_safetensors_with_nan_weights(hf_dir):
    from safetensors.torch import load_file, save_file

    f = hf_dir / "model.safetensors"
    tensors = load_file(f)
    name = sorted(k for k in tensors if k.endswith("down_proj.weight"))[0]
    tensors[name][0, 3] = float("inf")
    save_file(tensors, f)
    with pytest.raises(ModelFileError, match=rf"model\.safetensors: tensor {name} holds NaN or infinite"):
        load_hf_lm(hf_dir)


def test_config_weight_shape_mismatch(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=r"mlp\.\w+_proj\.weight.*shape"):
        load_hf_lm(hf_dir)


def test_missing_tensor_and_shard(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(hf_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        load_hf_lm(hf_dir)
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(ModelFileError, match="gone.safetensors"):
        load_hf_lm(hf_dir)


def test_unsupported_model_type_and_bad_json(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ModelFileError, match="gpt2"):
        load_hf_lm(hf_dir)
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json"):
        load_hf_lm(hf_dir)


def test_build_rejects_wrong_state(hf_dir):
    cfg, state = load_hf_lm(hf_dir)
    state["norm.weight"] = state["norm.weight"][:-1]
    with pytest.raises(ModelFileError, match="norm.weight"):
        build_llama(cfg, state)
    del state["norm.weight"]
    with pytest.raises(ModelFileError, match="missing"):
        build_llama(cfg, state)


@pytest.mark.parametrize("tensor,at", [("blk.0.ffn_down.weight", 0),  # a Q4_1 block scale (fp16 NaN)
                                       ("blk.0.ffn_down.weight", 2),  # a Q4_1 block offset
                                       ("token_embd.weight", 0),
                                       ("output_norm.weight", 2)])  # F32: the upper half of the first value
def test_gguf_with_nan_values(gguf_file, tensor, at):
    """A flipped bit pattern that decodes to NaN/inf is a corrupt file named with its tensor, not a NaN
    model nor an error from deep inside an export."""
    import gguf

    offset = {t.name: t.data_offset for t in gguf.GGUFReader(gguf_file).tensors}[tensor]
    data = bytearray(gguf_file.read_bytes())
    data[offset + at: offset + at + 2] = b"\xff\xff" if at == 0 or tensor.startswith("blk") else b"\x80\x7f"
    gguf_file.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=rf"tiny\.gguf: tensor {tensor} holds NaN or infinite"):
        load_gguf_lm(gguf_file)
