"""A trained Hugging Face model written as a GGUF file, so llama.cpp can serve it (``eval.engine=llamacpp``).

The metadata (architecture sizes, tokenizer, chat template) is copied from the GGUF file the model came from (the
packaged student's), only ``general.file_type`` changes; the tensors are the model's own weights in float32 (exact:
no rounding of the trained weights), named and laid out as llama.cpp's converter writes them: the query and key
projections of the ``llama`` architecture are stored with their rotary halves interleaved
(``convert_hf_to_gguf.LlamaModel.permute``), which transformers undoes when it loads a GGUF file. Only an
architecture whose tensor names are all in the table below is written; anything else is refused in one line
before a byte is written. The file is cached under ``$OMNIOPD_CACHE/gguf-export`` by the weights' identity.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omniopd.errors import ModelError

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
FILE_TYPES = {"f32": 0, "bf16": 32}  # llama_ftype: LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_BF16


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face ``llama`` parameter, or None when it has none."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
    return None


def permute_rotary(w, n_head: int):
    """The converter's interleaving of a query/key projection (out, in) for ``n_head`` heads (the inverse of
    transformers' ``reverse_permute_weights``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf(model, template: Path, out: Path, dtype: str = "f32") -> Path:
    """Write ``model``'s weights with ``template``'s metadata to ``out`` (atomically); returns ``out``. ``dtype``
    ``f32`` keeps the weights exactly; ``bf16`` rounds the matrices to bfloat16 (half the bytes, faster products
    on a CPU with AVX512-BF16; norms stay float32)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    reader = GGUFReader(str(template))
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ModelError(f"cannot write a GGUF for architecture {arch!r} (only llama is mapped): use eval.engine=hf")
    n_head = int(reader.fields["llama.attention.head_count"].contents())
    n_kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    wanted = {t.name for t in reader.tensors}
    state = {k: v for k, v in model.state_dict().items()}
    tensors: dict[str, np.ndarray] = {}
    for name, value in state.items():
        target = gguf_name(name)
        if target is None or target not in wanted:
            if name == "lm_head.weight" and "output.weight" not in wanted:
                continue  # tied to the embedding: the template has no output tensor
            raise ModelError(f"cannot write a GGUF: parameter {name} has no tensor in {template.name}")
        w = value.detach().float().cpu().numpy()
        if target.endswith("attn_q.weight"):
            w = permute_rotary(w, n_head)
        elif target.endswith("attn_k.weight"):
            w = permute_rotary(w, n_kv)
        tensors[target] = np.ascontiguousarray(w, dtype=np.float32)
    if missing := wanted - set(tensors):
        raise ModelError(f"cannot write a GGUF: the model has no weights for {sorted(missing)[:3]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    writer = GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by the writer itself
        if key == "general.file_type":
            writer.add_uint32(key, FILE_TYPES[dtype])
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:  # the template's order
        w = tensors[t.name]
        if dtype == "bf16" and w.ndim == 2:
            q = quants.quantize(w, GGMLQuantizationType.BF16)
            writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(t.name, w)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def gguf_for(model, template: Path, dtype: str = "f32") -> Path:
    """The GGUF file llama.cpp runs for ``model``: written once into ``$OMNIOPD_CACHE/gguf-export``, keyed by a hash
    of the weights themselves and the template's name (a model changed in training gets a new file)."""
    from omniopd.engine.models import cache_dir

    digest = hashlib.sha256(f"{template.name}:{dtype}".encode())
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    out = cache_dir() / "gguf-export" / f"{digest.hexdigest()[:16]}.{dtype}.gguf"
    if out.is_file():
        return out
    return export_gguf(model, template, out, dtype)
