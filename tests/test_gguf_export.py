"""GGUF export/import: ours -> GGUF -> gguf reader exact; import -> export byte-identical."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from compressjax import formats
from compressjax.io import build_model, gguf, gguf_core, model_params

_RNG = np.random.default_rng(0)


def _qa(k, n, *, bits, group_size, symmetric=True, scale_dtype=np.float16):
  """A random QuantizedArray (codes, float16 scales and zeros as RTN stores them)."""
  g = k // group_size
  codes = _RNG.integers(0, 2**bits, (k, n)).astype(np.uint8)
  scale = _RNG.uniform(0.001, 0.02, (g, n)).astype(scale_dtype)
  zero = None if symmetric else _RNG.uniform(-0.2, 0.0, (g, n)).astype(scale_dtype)
  return formats.QuantizedArray.from_codes(
      jnp.asarray(codes), jnp.asarray(scale), None if zero is None else jnp.asarray(zero),
      bits=bits, group_size=group_size, symmetric=symmetric)


def quantize_rtn(w, *, bits, group_size, symmetric=True, scale_dtype=np.float16):
  return _qa(*w.shape, bits=bits, group_size=group_size, symmetric=symmetric,
             scale_dtype=scale_dtype)


def _deq(t):
  """Reference: the gguf package's own dequantization of a tensor, as (out, in) float32."""
  from gguf import quants
  return np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
      tuple(int(d) for d in reversed(t.shape)))


def _ours(kernel, heads=None):
  """Our leaf as GGUF rows: (out, in), Q/K rows permuted as llama.cpp does."""
  w = np.asarray(formats.materialize(kernel), np.float32).T
  return tiny.permute_qk(w, heads) if heads else w


def _quantized_tiny(model):
  """Tiny model whose linears are quantized in every exportable grid (mixed per layer)."""
  p = jax.tree.map(np.asarray, model_params(model))
  for i, L in p["layers"].items():
    for grp, name, kw in (("attn", "q_proj", dict(bits=4, group_size=32, symmetric=False)),
                          ("attn", "k_proj", dict(bits=8, group_size=32, symmetric=True)),
                          ("attn", "v_proj", dict(bits=4, group_size=64, symmetric=True)),
                          ("attn", "o_proj", dict(bits=8, group_size=64, symmetric=True)),
                          ("mlp", "gate_proj", dict(bits=4, group_size=32, symmetric=False)),
                          ("mlp", "up_proj", dict(bits=4, group_size=32, symmetric=True)),
                          ("mlp", "down_proj", dict(bits=4, group_size=128, symmetric=False))):
      L[grp][name]["kernel"] = quantize_rtn(jnp.asarray(L[grp][name]["kernel"]), **kw)
  return p


def test_ours_to_gguf_reader_exact(tmp_path, tiny_gguf):
  src, model = tiny_gguf
  cfg = model.cfg
  p = _quantized_tiny(model)
  out = str(tmp_path / "q.gguf")
  written = gguf.export_gguf(p, cfg, src, out)
  assert written["blk.0.attn_q.weight"] == "Q4_1" and written["blk.0.attn_k.weight"] == "Q8_0"
  assert written["blk.0.attn_v.weight"] == "Q4_0" and written["blk.1.ffn_down.weight"] == "Q4_1"
  assert written["token_embd.weight"] == "F32" and written["blk.0.attn_norm.weight"] == "F32"
  import gguf as gg
  r = gg.GGUFReader(out)
  ts = {t.name: t for t in r.tensors}
  assert {n: t.tensor_type.name for n, t in ts.items()} == written
  for i in range(cfg.num_layers):
    L = p["layers"][i]
    for ours, theirs, heads in (("q_proj", "attn_q", cfg.num_heads),
                                ("k_proj", "attn_k", cfg.num_kv_heads),
                                ("v_proj", "attn_v", None), ("o_proj", "attn_output", None)):
      np.testing.assert_array_equal(_deq(ts[f"blk.{i}.{theirs}.weight"]),
                                    _ours(L["attn"][ours]["kernel"], heads))
    for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
      np.testing.assert_array_equal(_deq(ts[f"blk.{i}.{theirs}.weight"]),
                                    _ours(L["mlp"][ours]["kernel"]))
  np.testing.assert_array_equal(_deq(ts["token_embd.weight"]), p["embed"]["embedding"])
  # Metadata: our loader reads the file back to the same config, and the source tokenizer.
  cfg2, _, tok = gguf.load_gguf(out)
  cfg_src, _, tok_src = gguf.load_gguf(src)
  assert cfg2 == cfg_src
  text = "the 2024 heat"
  assert (tok.encode(text, add_special_tokens=False).ids ==
          tok_src.encode(text, add_special_tokens=False).ids)
  # ... and import keeps them quantized, equal to our leaves exactly (codes, scales, weights).
  _, pq, _ = gguf.load_gguf(out, keep_quantized=True)
  q_in = pq["layers"][0]["attn"]["q_proj"]["kernel"]
  assert isinstance(q_in, formats.QuantizedArray) and (q_in.bits, q_in.symmetric) == (4, False)
  for i in range(cfg.num_layers):
    for grp in ("attn", "mlp"):
      for name, leaf in p["layers"][i][grp].items():
        np.testing.assert_array_equal(np.asarray(pq["layers"][i][grp][name]["kernel"].materialize()),
                                      np.asarray(leaf["kernel"].materialize()))


def _write_foreign_gguf(path, model, hidden):
  """A GGUF made by the gguf package's own quantizers (Q8_0 embedding, Q4_1/Q4_0/Q8_0 linears)
  plus Q4_K / Q2_K blocks laid out as llama.cpp does (largest sub-block scale 63 / 15)."""
  import gguf as gg
  from gguf import quants
  T = gg.GGMLQuantizationType
  tiny.write_tiny_gguf(path + ".f32", model)
  r = gg.GGUFReader(path + ".f32")
  w = gg.GGUFWriter(path, arch="llama")
  for key, f in r.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
      continue
    if f.types[0] == gg.GGUFValueType.ARRAY:
      w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[1])
    else:
      w.add_key_value(key, f.contents(), f.types[0])
  w.add_file_type(gg.LlamaFileType.MOSTLY_Q4_1)  # as llama.cpp's quantizer writes
  w.add_quantization_version(gg.GGML_QUANT_VERSION)
  rng = np.random.default_rng(3)
  choice = {"attn_q": T.Q4_1, "attn_k": T.Q4_0, "attn_v": T.Q8_0, "attn_output": "Q4_K",
            "ffn_gate": "Q2_K", "ffn_up": "Q4_K", "ffn_down": T.Q4_1}
  for t in r.tensors:
    a = np.asarray(t.data, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    kind = t.name.split(".")[-2]
    if t.name == "token_embd.weight":
      w.add_tensor(t.name, quants.quantize(a, T.Q8_0), raw_dtype=T.Q8_0)
    elif kind in choice and choice[kind] in ("Q4_K", "Q2_K"):
      n, k = a.shape
      top, sub, bits = (63, 8, 4) if choice[kind] == "Q4_K" else (15, 16, 2)
      d = rng.uniform(1e-3, 3e-3, (n, k // 256)).astype(np.float16).astype(np.float32)
      sc = rng.integers(0, top + 1, (n, k // 256, sub)); sc[..., 0] = top
      dm = rng.uniform(1e-3, 3e-3, (n, k // 256)).astype(np.float16).astype(np.float32)
      mn = rng.integers(0, top + 1, (n, k // 256, sub)); mn[..., 1] = top
      data = gguf_core.encode(choice[kind], rng.integers(0, 2**bits, (n, k)).astype(np.uint8),
                              (d[..., None] * sc).reshape(n, -1).astype(np.float32),
                              -(dm[..., None] * mn).reshape(n, -1).astype(np.float32))
      w.add_tensor(t.name, data, raw_dtype=getattr(T, choice[kind]))
    elif kind in choice:
      w.add_tensor(t.name, quants.quantize(a, choice[kind]), raw_dtype=choice[kind])
    else:
      w.add_tensor(t.name, a)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  os.remove(path + ".f32")
  return path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
  model = tiny.tiny_model(seed=2, hidden_size=256, intermediate_size=256, num_layers=1)
  return _write_foreign_gguf(str(tmp_path_factory.mktemp("g") / "foreign.gguf"), model, 256)


def test_import_exact_and_export_byte_identical(tmp_path, foreign):
  import gguf as gg
  cfg, dense, _ = gguf.load_gguf(foreign)
  cfg_q, pq, _ = gguf.load_gguf(foreign, keep_quantized=True)
  assert cfg_q == cfg
  kinds = {}
  for i in range(cfg.num_layers):
    for grp in ("attn", "mlp"):
      for name, leaf in pq["layers"][i][grp].items():
        k = leaf["kernel"]
        assert isinstance(k, formats.QuantizedArray), (i, name)
        kinds[name] = (k.bits, k.symmetric, k.group_size)
        # No re-quantization: exactly the gguf package's dequantization (un-permuted).
        np.testing.assert_array_equal(np.asarray(k.materialize()), dense["layers"][i][grp][name]["kernel"])
  assert kinds["q_proj"] == (4, False, 32) and kinds["k_proj"] == (4, True, 32)
  assert kinds["v_proj"] == (8, True, 32) and kinds["o_proj"] == (4, False, 32)
  assert kinds["gate_proj"] == (2, False, 16) and kinds["up_proj"] == (4, False, 32)
  out = str(tmp_path / "again.gguf")
  written = gguf.export_gguf(pq, cfg_q, foreign, out, types="source")
  a, b = gg.GGUFReader(foreign), gg.GGUFReader(out)
  assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
  for ta, tb in zip(a.tensors, b.tensors):
    assert ta.tensor_type == tb.tensor_type, ta.name
    assert np.asarray(ta.data).tobytes() == np.asarray(tb.data).tobytes(), ta.name
  assert written["blk.0.attn_output.weight"] == "Q4_K" and written["token_embd.weight"] == "Q8_0"
  assert written["blk.0.ffn_gate.weight"] == "Q2_K"
  # Metadata is copied in the source's order and the tensors laid out in its order: the whole
  # file comes back byte for byte.
  assert open(out, "rb").read() == open(foreign, "rb").read()
  fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
  fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
  for k, v in fa.items():
    if k not in ("general.file_type", "general.quantization_version"):
      assert fb[k] == v, k
  # The quantized model runs and gives the dense model's logits (same weights; matmul rounding).
  toks = jnp.asarray([[1, 2, 3, 4, 5, 6]], jnp.int32)
  lq, ld = build_model(cfg_q, pq)(toks), build_model(cfg, dense)(toks)
  np.testing.assert_allclose(np.asarray(lq), np.asarray(ld), atol=2e-4, rtol=2e-4)


def test_export_errors_name_the_leaf(tmp_path, tiny_gguf):
  src, model = tiny_gguf
  cfg = model.cfg
  p = jax.tree.map(np.asarray, model_params(model))
  p["layers"][1]["mlp"]["up_proj"]["kernel"] = quantize_rtn(
      jnp.asarray(p["layers"][1]["mlp"]["up_proj"]["kernel"]), bits=3, group_size=32)
  out = str(tmp_path / "x.gguf")
  with pytest.raises(ValueError, match=r"layers/1/mlp/up_proj/kernel.*bits=3.*no exact GGUF type.*"
                                       r"Types that would work: Q8_0"):
    gguf.export_gguf(p, cfg, src, out)
  assert not os.path.exists(out) and os.listdir(tmp_path) == []
  written = gguf.export_gguf(p, cfg, src, out, materialize_other=True, dense_type="F16")
  assert written["blk.1.ffn_up.weight"] == "F16"
  # group_size 16 (not a multiple of ggml's 32-blocks)
  p["layers"][1]["mlp"]["up_proj"]["kernel"] = quantize_rtn(
      jnp.asarray(p["layers"][0]["mlp"]["up_proj"]["kernel"]), bits=4, group_size=16)
  with pytest.raises(ValueError, match=r"layers/1/mlp/up_proj/kernel.*group_size=16"):
    gguf.export_gguf(p, cfg, src, out)
  # float32 scales that float16 cannot hold
  p["layers"][1]["mlp"]["up_proj"]["kernel"] = quantize_rtn(
      jnp.asarray(p["layers"][0]["mlp"]["up_proj"]["kernel"]), bits=4, group_size=32,
      scale_dtype=np.float32)
  with pytest.raises(ValueError, match=r"up_proj/kernel.*not float16 values, which Q4_0 stores"):
    gguf.export_gguf(p, cfg, src, out)
  # An asked-for K-quant whose 6-bit sub-block scales cannot hold RTN's float16 scales.
  p["layers"][1]["mlp"]["up_proj"]["kernel"] = quantize_rtn(
      jnp.asarray(p["layers"][0]["mlp"]["up_proj"]["kernel"]), bits=4, group_size=32)
  with pytest.raises(ValueError, match=r"Q4_K does not store"):  # K=64: not a multiple of 256
    gguf.export_gguf(p, cfg, src, out, types={"blk.1.ffn_up.weight": "Q4_K"})
  # Other compressed formats have no GGUF type.
  p["layers"][1]["mlp"]["up_proj"]["kernel"] = formats.Transposed(
      jnp.asarray(p["layers"][0]["mlp"]["up_proj"]["kernel"]).T)
  with pytest.raises(ValueError, match=r"layers/1/mlp/up_proj/kernel' is a Transposed.*no GGUF"):
    gguf.export_gguf(p, cfg, src, out)
  with pytest.raises(ValueError, match="tokenizer_or_source"):
    gguf.export_gguf(p, cfg, 3, out)
  with pytest.raises(ValueError, match="dense_type"):
    gguf.export_gguf(p, cfg, src, out, dense_type="Q4_0")


def test_q4k_export_needs_exact_sub_block_scales(tmp_path, foreign):
  cfg, pq, _ = gguf.load_gguf(foreign, keep_quantized=True)
  o = pq["layers"][0]["attn"]["o_proj"]["kernel"]
  # Asym 4-bit g32 of a 256-wide weight, float16 scales as RTN stores them: not d * (6-bit ints).
  pq["layers"][0]["attn"]["o_proj"]["kernel"] = quantize_rtn(o.materialize(), bits=4,
                                                             group_size=32, symmetric=False)
  with pytest.raises(ValueError, match=r"layers/0/attn/o_proj/kernel.*Q4_K: .*super-blocks"):
    gguf.export_gguf(pq, cfg, foreign, str(tmp_path / "k.gguf"),
                     types={"blk.0.attn_output.weight": "Q4_K"})
  # ... while the default picks Q4_1, which holds it exactly.
  w = gguf.export_gguf(pq, cfg, foreign, str(tmp_path / "k.gguf"))
  assert w["blk.0.attn_output.weight"] == "Q4_1"


def test_export_from_tokenizer_and_model(tmp_path, tiny_gguf):
  src, model = tiny_gguf
  _, _, tok = gguf.load_gguf(src)
  out = str(tmp_path / "t.gguf")
  written = gguf.export_gguf(model, None, tok, out, dense_type="BF16")
  assert written["blk.0.attn_q.weight"] == "BF16"
  cfg2, p2, tok2 = gguf.load_gguf(out)
  for text in ("the 2024 heat", "<|endoftext|> in spain"):
    assert tok2.encode(text, add_special_tokens=False).ids == tok.encode(
        text, add_special_tokens=False).ids
  assert cfg2.bos_token_id == model.cfg.bos_token_id and cfg2.num_heads == model.cfg.num_heads
  ref = np.asarray(model.layers[0].attn.q_proj.kernel.get_value())
  bf = np.asarray(jnp.asarray(ref).astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(p2["layers"][0]["attn"]["q_proj"]["kernel"], bf)


def test_export_is_atomic(tmp_path, tiny_gguf, monkeypatch):
  src, model = tiny_gguf
  out = tmp_path / "m.gguf"
  out.write_bytes(b"old")
  import gguf as gg
  def boom(self, *a, **k):
    raise RuntimeError("disk full")
  monkeypatch.setattr(gg.GGUFWriter, "write_tensors_to_file", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    gguf.export_gguf(model, None, src, str(out))
  assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.gguf"]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q2_K"])
def test_core_layouts_match_gguf_package(qtype):
  """gguf_core.decode's grid == gguf's own dequantize, bit for bit; encode(decode(x)) == x."""
  import gguf as gg
  from gguf import quants
  T = getattr(gg.GGMLQuantizationType, qtype)
  rng = np.random.default_rng(1)
  n, k = 6, 512
  if qtype in ("Q4_K", "Q2_K"):  # gguf has no NumPy quantizer for these: blocks as llama.cpp lays them
    top, sub, bits = (63, 8, 4) if qtype == "Q4_K" else (15, 16, 2)
    d = rng.uniform(1e-3, 1e-2, (n, 2)).astype(np.float16).astype(np.float32)
    sc = rng.integers(0, top + 1, (n, 2, sub)); sc[..., 3] = top
    dm = rng.uniform(1e-3, 1e-2, (n, 2)).astype(np.float16).astype(np.float32)
    mn = rng.integers(0, top + 1, (n, 2, sub)); mn[..., 5] = top
    data = gguf_core.encode(qtype, rng.integers(0, 2**bits, (n, k)).astype(np.uint8),
                            (d[..., None] * sc).reshape(n, -1).astype(np.float32),
                            -(dm[..., None] * mn).reshape(n, -1).astype(np.float32))
  else:
    data = quants.quantize(rng.standard_normal((n, k)).astype(np.float32), T)
  codes, scale, zero = gguf_core.decode(qtype, data, k)
  bits, symmetric, g = gguf_core.TYPE_FORMATS[qtype]
  s = np.repeat(scale.astype(np.float32), g, axis=1)
  w = (s * (codes.astype(np.float32) - 2.0**(bits - 1)) if symmetric else
       s * codes.astype(np.float32) + np.repeat(zero.astype(np.float32), g, axis=1))
  np.testing.assert_array_equal(w, quants.dequantize(data, T))
  again = gguf_core.encode(qtype, codes, scale.astype(np.float32),
                           None if zero is None else zero.astype(np.float32))
  assert again.tobytes() == data.tobytes()
