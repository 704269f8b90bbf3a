"""compressed-tensors / GPTQ export and import (compressjax.io.export), checked by the real clients.

Tolerances: logits are compared at ``atol=1e-4`` (measured ~4e-6: the dequantized weights are
equal bit for bit, the float32 forward passes of JAX and PyTorch differ in summation order);
weights decoded by the clients' own code are compared bit for bit where both decode in float32.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require
from safetensors.numpy import load_file

import tiny
from compressjax.formats.sparse import NMSparse
from compressjax.io import build_model, model_params
from compressjax.io import export as ex
from compressjax.io import qformats_core as core
from compressjax.quantize.rtn_core import quantize_rtn

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of such "
        "a man may be on his first entering a neighbourhood")


def _tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  tokens, merges, _ = tiny.tiny_vocab(tiny.TINY["vocab_size"])
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                             merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return tok


def _text_tokens():
  ids = _tokenizer().encode(TEXT).ids
  assert len(ids) > 100 and max(ids) > 256  # real text, and the merges fire
  return np.asarray(ids[:96])[None]


@pytest.fixture(scope="module")
def torch_tf():
  torch = require("torch")
  transformers = require("transformers")
  require("compressed_tensors")
  transformers.logging.set_verbosity_error()
  return torch, transformers


@functools.lru_cache(maxsize=1)
def _model():
  m = tiny.tiny_model(seed=3, tie_word_embeddings=False)
  return m.cfg, jax.tree.map(np.asarray, model_params(m))


def _random_q(shape, bits, group_size, sym, rng):
  """A QuantizedArray with random codes, float16 scales and integer zero points (numpy only)."""
  k, n = shape
  gs = group_size or k
  codes = rng.integers(0, 2**bits, shape).astype(np.uint8)
  scale = (rng.uniform(0.5, 1.5, (k // gs, n)) * 0.1 / 2**bits).astype(np.float16)
  z = None if sym else rng.integers(0, 2**bits, (k // gs, n)).astype(np.uint8)
  return core.from_codes_and_zero_points(core._pack_u32(codes, bits, 0), scale, z, bits=bits,
                                         group_size=gs, shape=shape, dtype=np.float32)


def _quantize(params, scheme, rtn=True):
  """Quantizes the decoder linears, ``scheme(path) -> (bits, group_size, symmetric)``: with RTN
  (asymmetric grids snapped to integer zero points), or random codes when ``rtn`` is false."""
  rng = np.random.default_rng(0)

  def f(path, x):
    keys = [getattr(k, "key", None) for k in path]
    if keys[0] == "layers" and keys[-1] == "kernel":
      bits, gs, sym = scheme(keys)
      if not rtn:
        return _random_q(x.shape, bits, gs, sym, rng)
      return ex.snap_zero_points(quantize_rtn(x, bits=bits, group_size=gs, symmetric=sym))
    return x

  return jax.tree_util.tree_map_with_path(f, params)


def _ours(cfg, params, tokens):
  return np.asarray(build_model(cfg, params)(jnp.asarray(tokens, jnp.int32)))


def _nll(logits, tokens):
  lp = logits[0, :-1] - np.log(np.exp(logits[0, :-1]).sum(-1, keepdims=True))
  return float(-np.mean(lp[np.arange(tokens.shape[1] - 1), tokens[0, 1:]]))


def _dir_tensors(path):
  return load_file(os.path.join(path, "model.safetensors"))


def _assert_same_bytes(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


def _attn_g32_mlp_g64(sym):
  return lambda keys: (4, 32 if keys[2] == "attn" else 64, sym)


# --------------------------------------------------------------------------------------------
# ours -> compressed-tensors -> transformers / compressed-tensors
# --------------------------------------------------------------------------------------------


def test_ct_symmetric_export_loads_in_transformers(tmp_path, torch_tf):
  """Sym 4-bit, g32 (attention) and g64 (MLP): two config groups; lm_head left dense."""
  torch, transformers = torch_tf
  cfg, params = _model()
  qp = _quantize(params, _attn_g32_mlp_g64(True))
  path = ex.export_compressed_tensors(tmp_path / "ct", cfg, qp, _tokenizer())
  qc = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
  # g32 (attention), g64 (down_proj, K=128) and channel (gate/up_proj: g64 = K = 64)
  strategies = sorted((g["weights"]["strategy"], g["weights"]["group_size"] or 0)
                      for g in qc["config_groups"].values())
  assert strategies == [("channel", 0), ("group", 32), ("group", 64)], strategies
  assert qc["ignore"] == ["lm_head"]
  ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  tokens = _text_tokens()
  with torch.inference_mode():
    want = ref(torch.as_tensor(tokens)).logits.numpy()
  got = _ours(cfg, qp, tokens)
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  for i in range(cfg.num_layers):  # transformers decompressed exactly our weights
    for part, name in (("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "down_proj")):
      mod = getattr(getattr(ref.model.layers[i], "self_attn" if part == "attn" else "mlp"), name)
      w = np.asarray(qp["layers"][i][part][name]["kernel"].materialize())
      np.testing.assert_array_equal(mod.weight.detach().numpy().T, w)
  # the tokenizer files transformers reads encode the text as ours does
  tok = transformers.AutoTokenizer.from_pretrained(path)
  assert tok(TEXT)["input_ids"][:96] == tokens[0].tolist()


def _ct_decompress(path):
  """Dense HF state dict of a compressed-tensors directory, decoded by compressed-tensors' own
  ``PackedQuantizationCompressor.decompress`` under the scheme parsed from our config.json."""
  import torch  # pylint: disable=g-import-not-at-top
  from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # pylint: disable=g-import-not-at-top
  from compressed_tensors.quantization import QuantizationConfig  # pylint: disable=g-import-not-at-top

  qc = QuantizationConfig.model_validate(
      json.load(open(os.path.join(path, "config.json")))["quantization_config"])
  groups = list(qc.config_groups.values())
  sd = {k: torch.from_numpy(v) for k, v in _dir_tensors(path).items()}
  out = {}
  for k in [k for k in sd if k.endswith(".weight_packed")]:
    mod = k[:-len(".weight_packed")]
    scheme = next(g for g in groups if mod in g.targets or "Linear" in g.targets)
    local = {n[len(mod) + 1:]: sd.pop(n) for n in list(sd) if n.startswith(mod + ".weight_")}
    out[mod + ".weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
  out.update(sd)
  return out


def test_ct_asymmetric_export_decoded_by_compressed_tensors(tmp_path, torch_tf):
  """Asym 4-bit g32/g64. transformers 5.23 + compressed-tensors 0.20 cannot load *any*
  asymmetric pack-quantized checkpoint (even one compressed-tensors wrote: the packed
  weight_zero_point is refused as a size mismatch; llm-compressor#1618), so the export is
  decoded by compressed-tensors' own decompressor and run in transformers' LlamaForCausalLM."""
  torch, transformers = torch_tf
  cfg, params = _model()
  qp = _quantize(params, _attn_g32_mlp_g64(False))
  path = ex.export_compressed_tensors(tmp_path / "ct", cfg, qp)
  sd = _ct_decompress(path)
  # compressed-tensors decodes (q - z) * scale in the scale dtype (float16 here): equal to our
  # float32 decoding up to float16 rounding
  for name in ("mlp.up_proj", "mlp.down_proj", "self_attn.k_proj"):
    part, n = name.split(".")
    w = np.asarray(qp["layers"][1][part.replace("self_attn", "attn")][n]["kernel"].materialize())
    got = sd[f"model.layers.1.{name}.weight"]
    assert got.dtype == torch.float16
    np.testing.assert_allclose(got.float().numpy().T, w, rtol=2**-11, atol=0)
    sd[f"model.layers.1.{name}.weight"] = got.float()
  sd = {k: v.float() for k, v in sd.items()}
  hf_cfg = json.load(open(os.path.join(path, "config.json")))
  hf_cfg.pop("quantization_config")
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
  ref.load_state_dict(sd, strict=True)
  tokens = _text_tokens()
  with torch.inference_mode():
    want = ref(torch.as_tensor(tokens)).logits.numpy()
  got = _ours(cfg, qp, tokens)
  np.testing.assert_allclose(got, want, atol=5e-3, rtol=0)  # float16-rounded weights there
  assert abs(_nll(got, tokens) - _nll(want, tokens)) < 1e-3  # measured 1.8e-4 of 6.27
  # with our weights rounded to float16 as compressed-tensors' decode rounds them: 1e-4
  rounded = jax.tree.map(lambda x: np.asarray(x.materialize()).astype(np.float16).astype(
      np.float32) if hasattr(x, "materialize") else x, qp,
      is_leaf=lambda x: hasattr(x, "materialize"))
  got16 = _ours(cfg, rounded, tokens)
  np.testing.assert_allclose(got16, want, atol=1e-4, rtol=0)
  assert abs(_nll(got16, tokens) - _nll(want, tokens)) < 1e-5


# --------------------------------------------------------------------------------------------
# compressed-tensors' own checkpoint -> compressjax
# --------------------------------------------------------------------------------------------


def _tool_checkpoint(path, sym, torch, transformers):
  """A pack-quantized checkpoint written by compressed-tensors (quantization lifecycle +
  ModelCompressor) from a tiny torch LlamaForCausalLM; returns the in-memory model, decompressed."""
  from compressed_tensors.compressors import ModelCompressor  # pylint: disable=g-import-not-at-top
  from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config  # pylint: disable=g-import-not-at-top
  from compressed_tensors.quantization.utils import calculate_qparams  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)
  m = transformers.LlamaForCausalLM(hf_cfg).eval()
  qc = QuantizationConfig.model_validate({"config_groups": {"group_0": {
      "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": sym,
                                         "strategy": "group", "group_size": 32}}},
                                          "ignore": ["lm_head"]})
  apply_quantization_config(m, qc)
  for _, mod in m.named_modules():
    if hasattr(mod, "quantization_scheme"):
      w = mod.weight.data
      wg = w.reshape(w.shape[0], -1, 32)
      s, z = calculate_qparams(wg.amin(-1), wg.amax(-1), mod.quantization_scheme.weights)
      mod.weight_scale.data.copy_(s.to(mod.weight_scale.dtype))
      if hasattr(mod, "weight_zero_point"):
        mod.weight_zero_point.data.copy_(z)
  comp = ModelCompressor.from_pretrained_model(m, quantization_format="pack-quantized")
  comp.compress_model(m)
  m.save_pretrained(path)
  comp.update_config(path)
  _tokenizer().save(os.path.join(path, "tokenizer.json"))
  comp.decompress_model(m)
  return m


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_import_of_compressed_tensors_checkpoint(tmp_path, torch_tf, sym):
  torch, transformers = torch_tf
  path = str(tmp_path / "tool")
  tool_model = _tool_checkpoint(path, sym, torch, transformers)
  tokens = _text_tokens()
  if sym:  # the real client reads the tool's files
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  else:  # transformers cannot load asymmetric pack-quantized; the tool decompresses in memory
    ref = tool_model
  with torch.inference_mode():
    want = ref(torch.as_tensor(tokens)).logits.numpy()
  cfg, params, tok = ex.load_compressed_tensors(path)
  assert tok is not None
  leaf = params["layers"][0]["mlp"]["gate_proj"]["kernel"]
  assert type(leaf).__name__ == "QuantizedArray" and leaf.symmetric == sym and leaf.group_size == 32
  got = _ours(cfg, params, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert abs(_nll(got, tokens) - _nll(want, tokens)) < 1e-5  # same perplexity on the text
  # import -> export writes the tool's tensors byte for byte
  out = ex.export_compressed_tensors(tmp_path / "again", cfg, params)
  _assert_same_bytes(_dir_tensors(out), _dir_tensors(path))


# --------------------------------------------------------------------------------------------
# Round trips (no torch)
# --------------------------------------------------------------------------------------------


ROUND_TRIP = {
    "ct-sym-g32": ("ct", lambda k: (4, 32, True)),
    "ct-asym-g64": ("ct", lambda k: (4, 64, False)),
    "ct-mixed-3bit-channel": ("ct", lambda k: (3, None, False) if k[2] == "mlp" else (8, 16, True)),
    "ct-2bit-g16": ("ct", lambda k: (2, 16, False)),
    "gptq-sym-g32": ("gptq", lambda k: (4, 32, True)),
    "gptq-asym-channel-2bit": ("gptq", lambda k: (2, None, False)),
    "gptq-asym-8bit-g16": ("gptq", lambda k: (8, 16, False)),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_import_export_is_byte_identical(tmp_path, name):
  fmt, scheme = ROUND_TRIP[name]
  cfg, params = _model()
  qp = _quantize(params, scheme, rtn=False)
  save, load = ((ex.export_compressed_tensors, ex.load_compressed_tensors) if fmt == "ct"
                else (ex.export_gptq, ex.load_gptq))
  dtype = "float32" if fmt == "ct" else "float16"
  a = save(tmp_path / "a", cfg, qp, dtype=dtype)
  cfg2, p2, _ = load(a, dtype=dtype if fmt == "ct" else "float32")
  assert cfg2 == cfg
  if fmt == "ct":  # every leaf equal (GPTQ stores the dense tensors in float16)
    for x, y in zip(jax.tree.leaves(qp), jax.tree.leaves(p2)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for i in range(cfg.num_layers):
    for part, names in (("attn", ("q_proj", "v_proj")), ("mlp", ("up_proj", "down_proj"))):
      for n in names:
        np.testing.assert_array_equal(p2["layers"][i][part][n]["kernel"].materialize(),
                                      qp["layers"][i][part][n]["kernel"].materialize())
  b = save(tmp_path / "b", cfg2, p2, dtype=dtype)
  _assert_same_bytes(_dir_tensors(a), _dir_tensors(b))
  assert (json.load(open(os.path.join(a, "config.json")))
          == json.load(open(os.path.join(b, "config.json"))))


# --------------------------------------------------------------------------------------------
# GPTQ: checked against GPTQModel's reference dequantization (GPTQModel does not install here)
# --------------------------------------------------------------------------------------------


def _gptqmodel_dequantize(torch, qweight, qzeros, scales, g_idx, bits):
  """GPTQModel 7.7.0 ``TorchQuantLinear.dequantize_weight`` (bits 2/4/8, non-planar) after its
  ``convert_gptq_v1_to_v2_format_module`` (one int32 addition per qzeros word)."""
  offset = {2: 0b01010101010101010101010101010101, 4: 0b00010001000100010001000100010001,
            8: 0b00000001000000010000000100000001}[bits]
  qzeros = (qzeros.to(torch.int64) + offset).to(torch.int32)  # wraps as the int32 += does
  pack = 32 // bits
  wf = torch.arange(0, 32, bits, dtype=torch.int32)
  maxq = 2**bits - 1
  zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, pack), wf[None, None])
  zeros = torch.bitwise_and(zeros, maxq).reshape(qzeros.shape[0], -1)[:, :scales.shape[1]]
  weight = torch.bitwise_and(
      torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, pack, -1), wf[None, :, None]),
      maxq)
  weight = weight.reshape(-1, weight.shape[2])
  g = g_idx.long()
  return scales[g].float() * (weight - zeros[g]).float()


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 64, False), (2, None, False),
                                                 (8, 16, False)])
def test_gptq_export_matches_gptqmodel_dequantize(tmp_path, torch_tf, bits, group_size, sym):
  torch, _ = torch_tf
  cfg, params = _model()
  qp = _quantize(params, lambda k: (bits, group_size, sym), rtn=False)
  if not sym:  # zero point 0 in some groups: the v1 minus-one borrows across fields
    leaf = qp["layers"][0]["attn"]["q_proj"]["kernel"]
    zero = np.array(leaf.zero)
    zero[:, ::3] = 0.0
    qp["layers"][0]["attn"]["q_proj"]["kernel"] = type(leaf)(
        leaf.packed, leaf.scale, zero, bits=leaf.bits, group_size=leaf.group_size,
        shape=leaf.shape, symmetric=False, dtype=leaf.dtype)
    assert (core.integer_zero_points(qp["layers"][0]["attn"]["q_proj"]["kernel"]) == 0).any()
  path = ex.export_gptq(tmp_path / "g", cfg, qp)
  hf_cfg = json.load(open(os.path.join(path, "config.json")))
  assert hf_cfg["quantization_config"]["checkpoint_format"] == "gptq"
  assert hf_cfg["quantization_config"]["group_size"] == (group_size or -1)
  t = {k: torch.from_numpy(v) for k, v in _dir_tensors(path).items()}
  for i in range(cfg.num_layers):
    for part, hfpart, n in (("attn", "self_attn", "q_proj"), ("attn", "self_attn", "k_proj"),
                            ("mlp", "mlp", "down_proj")):
      mod = f"model.layers.{i}.{hfpart}.{n}"
      w = _gptqmodel_dequantize(torch, t[mod + ".qweight"], t[mod + ".qzeros"],
                                t[mod + ".scales"], t[mod + ".g_idx"], bits)
      ours = np.asarray(qp["layers"][i][part][n]["kernel"].materialize())
      np.testing.assert_allclose(w.numpy(), ours, rtol=0, atol=1e-6 * np.abs(ours).max())


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def test_leaves_without_public_equivalent_are_refused(tmp_path):
  cfg, params = _model()
  qp = _quantize(params, lambda k: (4, 32, True), rtn=False)
  w = params["layers"][1]["mlp"]["up_proj"]["kernel"]
  bad = dict(qp)
  bad["layers"] = {**qp["layers"], 1: {**qp["layers"][1], "mlp": {
      **qp["layers"][1]["mlp"], "up_proj": {"kernel": _nm(w)}}}}
  for fn in (ex.export_compressed_tensors, ex.export_gptq):
    with pytest.raises(ValueError, match=r"layers/1/mlp/up_proj/kernel.*NMSparse.*GGUF"):
      fn(tmp_path / "x", cfg, bad)
  assert not os.path.exists(tmp_path / "x")
  # asymmetric RTN keeps zero = min (a float offset): refused, naming the leaf and the way out
  raw = dict(qp)
  raw["layers"] = {**qp["layers"], 0: {**qp["layers"][0], "attn": {
      **qp["layers"][0]["attn"], "k_proj": {"kernel": quantize_rtn(
          params["layers"][0]["attn"]["k_proj"]["kernel"], bits=4, group_size=32,
          symmetric=False)}}}}
  with pytest.raises(ValueError, match=r"layers/0/attn/k_proj/kernel.*integer zero.*snap_zero"):
    ex.export_compressed_tensors(tmp_path / "x", cfg, raw)
  snapped = ex.snap_tree(raw)
  ex.export_compressed_tensors(tmp_path / "x", cfg, snapped)  # after snapping it exports
  # GPTQ: one scheme for all, 2/4/8 bits
  mixed = _quantize(params, lambda k: (4, 32 if k[2] == "attn" else 64, True), rtn=False)
  with pytest.raises(ValueError, match="one \\(bits, group_size, sym\\)"):
    ex.export_gptq(tmp_path / "y", cfg, mixed)
  with pytest.raises(ValueError, match="bits=3"):
    ex.export_gptq(tmp_path / "y", cfg, _quantize(params, lambda k: (3, 32, True), rtn=False))


def _nm(w):
  mag = np.abs(np.asarray(w)).reshape(-1, 4, w.shape[1])
  keep = np.argsort(-mag, axis=1).argsort(axis=1) < 2
  return NMSparse.from_dense(jnp.asarray(w), jnp.asarray(keep.reshape(w.shape)), n=2, m=4)


def test_act_order_g_idx_is_refused_on_import():
  qa = quantize_rtn(jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)), jnp.float32),
                    bits=4, group_size=32, symmetric=True)
  t = core.gptq_pack(qa)
  t["g_idx"] = np.random.default_rng(1).permutation(t["g_idx"])
  with pytest.raises(ValueError, match="act-order"):
    core.gptq_unpack(t, bits=4, sym=True, in_features=64, out_features=32)


def test_cli_export(tmp_path):
  from compressjax import checkpoint, cli  # pylint: disable=g-import-not-at-top
  from compressjax.pipeline import model_config_dict  # pylint: disable=g-import-not-at-top

  cfg, params = _model()
  qp = _quantize(params, lambda k: (4, 32, True), rtn=False)
  ck = checkpoint.save(str(tmp_path / "ck"), qp, metadata={"model_config": model_config_dict(cfg)},
                       tokenizer=_tokenizer())
  for fmt, load in (("compressed-tensors", ex.load_compressed_tensors), ("gptq", ex.load_gptq)):
    out = str(tmp_path / fmt)
    assert cli.main(["compressjax", "export", "--checkpoint", ck, "--format", fmt,
                     "--out", out]) == 0
    cfg2, p2, tok = load(out)
    assert cfg2 == cfg and tok is not None
    np.testing.assert_array_equal(p2["layers"][1]["mlp"]["down_proj"]["kernel"].materialize(),
                                  qp["layers"][1]["mlp"]["down_proj"]["kernel"].materialize())
  assert cli.main(["compressjax", "export", "--checkpoint", ck, "--format", "gptq",
                   "--out", str(tmp_path / "gptq")]) == 1  # exists: one-line error
  from compressjax.io import gguf  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "model.gguf")
  assert cli.main(["compressjax", "export", "--checkpoint", ck, "--format", "gguf",
                   "--out", out]) == 0
  cfg3, p3, _ = gguf.load_gguf(out, keep_quantized=True)
  assert cfg3.num_layers == cfg.num_layers
  np.testing.assert_array_equal(
      p3["layers"][1]["mlp"]["down_proj"]["kernel"].materialize(),
      qp["layers"][1]["mlp"]["down_proj"]["kernel"].materialize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_numpy_bitstream_matches_formats_packing(bits):
  from compressjax.formats import packing  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(bits)
  for length in (7, 32, 40):
    c = rng.integers(0, 2**bits, (length, 5)).astype(np.uint8)
    words = core._pack_u32(c, bits, 0)
    np.testing.assert_array_equal(words, np.asarray(packing.pack(c, bits, axis=0)))
    np.testing.assert_array_equal(core._unpack_u8(words, bits, length, 0), c)
    np.testing.assert_array_equal(core._pack_u32(c.T, bits, 1), words.T)


def test_import_refuses_what_quantized_array_cannot_hold(tmp_path):
  cfg, params = _model()
  path = ex.export_compressed_tensors(tmp_path / "ct", cfg,
                                      _quantize(params, lambda k: (4, 32, True), rtn=False))
  conf = json.load(open(os.path.join(path, "config.json")))
  for key, value, match in (("num_bits", 5, "num_bits=5"), ("type", "float", "type 'float'"),
                            ("strategy", "tensor", "strategy 'tensor'")):
    bad = json.loads(json.dumps(conf))
    bad["quantization_config"]["config_groups"]["group_0"]["weights"][key] = value
    json.dump(bad, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=f"q_proj.*{match}"):
      ex.load_compressed_tensors(path)


class _ExplodingTokenizer:
  def save(self, path):
    raise RuntimeError("disk full")

  def id_to_token(self, i):
    return str(i)


def test_writes_are_atomic(tmp_path):
  cfg, params = _model()
  qp = _quantize(params, lambda k: (4, 32, True), rtn=False)
  old = ex.export_gptq(tmp_path / "g", cfg, qp)
  before = {n: open(os.path.join(old, n), "rb").read() for n in os.listdir(old)}
  for fn in (ex.export_gptq, ex.export_compressed_tensors):
    with pytest.raises(RuntimeError, match="disk full"):
      fn(tmp_path / "g", cfg, qp, _ExplodingTokenizer(), overwrite=True)
    assert {n: open(os.path.join(old, n), "rb").read() for n in os.listdir(old)} == before
    with pytest.raises(FileExistsError, match="non-empty"):
      fn(tmp_path / "g", cfg, qp)
  assert sorted(os.listdir(tmp_path)) == ["g"]  # no temporary directories left behind
