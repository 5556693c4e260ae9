"""Real models, tiny, built on the spot for the upload tests and the hostile-upload corpus
(bench/hostile_corpus.py): a Hugging Face folder (a one-layer Llama with MiniLM's tokenizer),
a GGUF file (a one-layer llama with SmolLM2's tokenizer), GGUF files written field by field
(so that any field can lie), and the archives that carry them."""

from __future__ import annotations

import io
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
HIDDEN = 16


def tiny_hf_folder(folder: Path) -> Path:
    """A one-layer Llama saved by transformers as safetensors, with a real tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantcore.models.bundled import resolve_bundled

    minilm = resolve_bundled("bundled:minilm-l6").path
    config = LlamaConfig(vocab_size=30522, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, folder / name)
    return folder


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz", prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes], prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(prefix + name, content)
    return buffer.getvalue()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def tiny_gguf(path: Path, lie: dict | None = None) -> Path:
    """A one-layer llama GGUF with SmolLM2's tokenizer (its metadata copied), f32 tensors."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from quantcore.models.bundled import resolve_bundled

    smol = resolve_bundled("bundled:smollm2-135m")
    reader = GGUFReader(smol.path / smol.gguf_file)
    writer = GGUFWriter(str(path), "llama")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    for key, value in (("context_length", 1024), ("embedding_length", HIDDEN), ("block_count", 1),
                       ("feed_forward_length", 32), ("attention.head_count", 2), ("attention.head_count_kv", 1),
                       ("rope.dimension_count", HIDDEN // 2), ("vocab_size", vocab)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_name("tiny-llama")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        elif kind == GGUFValueType.STRING:
            writer.add_string(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), kind)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,),
              "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
              "blk.0.attn_q.weight": (HIDDEN, HIDDEN), "blk.0.attn_k.weight": (HIDDEN // 2, HIDDEN),
              "blk.0.attn_v.weight": (HIDDEN // 2, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
              "blk.0.ffn_gate.weight": (32, HIDDEN), "blk.0.ffn_up.weight": (32, HIDDEN),
              "blk.0.ffn_down.weight": (HIDDEN, 32)}
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_bytes(tensors=None, kv=None, tensor_count=None, data: bytes | None = None) -> bytes:
    """A GGUF v3 file written field by field, so any field can lie. Honest by default: llama
    metadata, a tokenizer name and one 4x8 f32 tensor."""
    kv = kv if kv is not None else [
        gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama"),
        gguf_string("tokenizer.ggml.model") + struct.pack("<I", 8) + gguf_string("gpt2"),
    ]
    tensors = tensors if tensors is not None else [("token_embd.weight", [8, 4], 0, 0)]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if tensor_count is None else tensor_count, len(kv))
    body = b"".join(kv)
    for name, dims, ggml_type, offset in tensors:
        body += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        body += struct.pack("<IQ", ggml_type, offset)
    header = head + body
    header += bytes(-len(header) % 32)
    return header + (data if data is not None else bytes(4 * 8 * 4))
