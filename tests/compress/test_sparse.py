"""Encoder token sparsification (Sparse DETR) post hoc: rho = 1 is exactly the original,
the token selection, the native and PyTorch paths agree, the decoder attention map, the
trained scorer beats a random choice, save/load round trips, and named errors."""

import pytest
import torch

from ddetr import DeformableDetr, compress
from ddetr.engine.compress import save_detector
from ddetr.engine.predict import load_detector
from ddetr.models.token_selection import select_tokens
from ddetr.ops.native_layers import library_ready
from tests.models.detr_cases import VARIANTS, assert_same, images, outputs, tiny_model

native_ready = pytest.mark.skipif(not library_ready(torch.zeros(1)),
                                  reason="native extension or OpenBLAS missing")


def calibration(count=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 64, 96, generator=g) for _ in range(count)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("native", [True, False])
def test_rho_one_is_the_original(variant, native):
    model = tiny_model(variant)
    model.set_native_layers(native and library_ready(torch.zeros(1)))
    x, mask = images()
    dense = compress.sparsify_encoder(model, 1.0)
    assert dense.transformer.token_scorer is None
    assert dense.state_dict().keys() == model.state_dict().keys()
    assert dense.compression == [{"technique": "sparsify_encoder", "rho": 1.0}]
    assert_same(outputs(dense, x, mask), outputs(model, x, mask))


@pytest.mark.parametrize("variant", ["plain", "box_refine", "two_stage"])
@pytest.mark.parametrize("native", [True, False])
def test_selecting_every_token_is_the_dense_encoder(variant, native):
    # ceil(0.9999 * S) = S on these small maps: the sparse path with every row chosen
    model = tiny_model(variant)
    model.set_native_layers(native and library_ready(torch.zeros(1)))
    x, mask = images()
    every = compress.sparsify_encoder(model, 0.9999)
    assert every.transformer.token_scorer is not None
    assert_same(outputs(every, x, mask), outputs(model, x, mask))


def test_select_tokens_counts_and_padding():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 20, generator=g)
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[1, 10:] = True   # 10 valid tokens
    pad[2, 1:] = True    # 1 valid token
    index = select_tokens(scores, pad, 0.3)
    assert index.shape == (3, 6)  # ceil(0.3 * 20)
    for n, k in enumerate([6, 3, 1]):
        row = index[n]
        assert torch.equal(row, row.unique())  # ascending, distinct
        chosen = row[~pad[n, row]]
        assert len(chosen) == k
        best = scores[n].masked_fill(pad[n], float("-inf")).topk(k).indices.sort()[0]
        assert torch.equal(chosen, best)
    assert select_tokens(scores, None, 1e-6).shape == (3, 1)  # at least one token
    assert select_tokens(torch.zeros(1, 10), None, 0.3).tolist() == [[0, 1, 2]]  # ties: in order


@native_ready
@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_native_sparse_encoder_matches_pytorch_path(variant):
    model = compress.sparsify_encoder(tiny_model(variant), 0.3)
    x, mask = images()
    model.set_native_layers(True)
    got = outputs(model, x, mask)
    model.set_native_layers(False)
    want = outputs(model, x, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_sparse_model_trains():
    model = compress.sparsify_encoder(tiny_model("box_refine"), 0.4).train()
    x, mask = images()
    out = model(x, mask)
    (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
    layer = model.transformer.encoder.layers[0]
    assert torch.isfinite(layer.self_attn.value_proj.weight.grad).all()
    assert layer.linear1.weight.grad.abs().sum() > 0
    # the selection is discrete: the scorer learns only from train_token_scorer
    assert all(p.grad is None for p in model.transformer.token_scorer.parameters())


def test_decoder_attention_map():
    model = tiny_model("box_refine")
    x, mask = images()
    (found,) = compress.encoder_token_saliency(model, [(x, mask)])
    n, s = found.dam.shape
    assert found.tokens.shape == (n, s, model.config["d_model"]) and found.padding.shape == (n, s)
    assert (found.dam[found.padding] == 0).all() and (found.dam >= 0).all()
    # every query of every layer and head spends a total weight of at most 1
    cfg = model.config
    most = cfg["num_decoder_layers"] * model.num_queries * cfg["num_heads"]
    assert (found.dam.sum(1) <= most * (1 + 1e-5)).all() and (found.dam.sum(1) > 0.5 * most).all()


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_trained_scorer_beats_a_random_choice(variant):
    model = tiny_model(variant)
    state = compress.train_token_scorer(model, calibration(), 0.3, steps=150, time_budget=30)
    held_out = calibration(seed=9)
    trained = compress.selection_recall(compress.sparsify_encoder(model, 0.3, state), model,
                                        held_out)
    untrained = compress.selection_recall(compress.sparsify_encoder(model, 0.3), model,
                                          held_out)
    # a random choice recovers about rho = 0.3 of the top tokens
    assert trained > max(untrained, 0.3) + 0.2, (trained, untrained)


def test_scorer_is_kept_or_replaced():
    model = tiny_model("plain")
    state = compress.train_token_scorer(model, calibration(2), 0.5, steps=5)
    half = compress.sparsify_encoder(model, 0.5, state)
    assert torch.equal(half.transformer.token_scorer.linear2.weight, state["linear2.weight"])
    third = compress.sparsify_encoder(half, 0.3)  # keeps half's scorer
    assert torch.equal(third.transformer.token_scorer.linear2.weight, state["linear2.weight"])
    assert [r["rho"] for r in third.compression] == [0.5, 0.3]
    assert compress.sparsify_encoder(third, 1.0).transformer.token_scorer is None


def test_round_trips(tmp_path):
    model = tiny_model("two_stage")
    x, mask = images()
    state = compress.train_token_scorer(model, calibration(2), 0.3, steps=5)
    sparse = compress.sparsify_encoder(model, 0.3, state)
    want = outputs(sparse, x, mask)
    sparse.save_pretrained(tmp_path / "model")
    again = DeformableDetr.from_pretrained(tmp_path / "model").eval()
    assert again.config["encoder_token_ratio"] == 0.3 and again.compression == sparse.compression
    assert_same(outputs(again, x, mask), want)
    save_detector(sparse, {"config": {}}, str(tmp_path / "checkpoint.pth"))
    loaded = load_detector(str(tmp_path / "checkpoint.pth")).model
    assert_same(outputs(loaded, x, mask), want)


@pytest.mark.parametrize("call, name", [
    (lambda m: compress.sparsify_encoder(m, 0), "rho"),
    (lambda m: compress.sparsify_encoder(m, -0.5), "rho"),
    (lambda m: compress.sparsify_encoder(m, 1.5), "rho"),
    (lambda m: compress.sparsify_encoder(m, float("nan")), "rho"),
    (lambda m: compress.sparsify_encoder(m, "0.5"), "rho"),
    (lambda m: compress.sparsify_encoder(m, True), "rho"),
    (lambda m: compress.sparsify_encoder(torch.nn.Linear(2, 2), 0.5), "model"),
    (lambda m: compress.sparsify_encoder(m, 0.5, {"weight": torch.zeros(1)}), "scorer_state"),
    (lambda m: compress.train_token_scorer(m, calibration(1), 0), "rho"),
    (lambda m: compress.train_token_scorer(m, calibration(1), 0.5, steps=0), "steps"),
    (lambda m: compress.train_token_scorer(m, calibration(1), 0.5, time_budget=0), "time_budget"),
    (lambda m: compress.train_token_scorer(m, [], 0.5), "images"),
    (lambda m: compress.train_token_scorer("model", calibration(1), 0.5), "model"),
    (lambda m: compress.selection_recall(m, m, calibration(1)), "sparse"),
    (lambda m: DeformableDetr(**{**m.config, "encoder_token_ratio": 0.0}), "encoder_token_ratio"),
    (lambda m: DeformableDetr(**{**m.config, "encoder_token_ratio": 2}), "encoder_token_ratio"),
])
def test_bad_arguments_named(call, name):
    with pytest.raises(ValueError, match=name):
        call(tiny_model("plain"))


def test_combines_with_the_other_techniques():
    # the scorer and the ratio survive the techniques applied after (or before) it
    model = tiny_model("box_refine")
    x, mask = images()
    sparse = compress.sparsify_encoder(compress.truncate_decoder(model, 1), 0.3)
    both = compress.prune_points(compress.truncate_decoder(sparse, 1), enc_points=1)
    assert both.config["encoder_token_ratio"] == 0.3
    assert torch.equal(both.transformer.token_scorer.linear1.weight,
                       sparse.transformer.token_scorer.linear1.weight)
    assert outputs(both, x, mask)["pred_boxes"].shape == (2, model.num_queries, 4)
    half = compress.to_bfloat16(sparse)
    assert torch.isfinite(outputs(half, x, mask)["pred_boxes"].float()).all()
