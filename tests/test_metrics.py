"""The probe's metric functions on hand-made tensors whose answers are known."""

import math

import pytest
import torch

from saturation import metrics


def test_token_groups_left_and_right_padding():
    # right padding: [BOS, a, IMG, IMG, q1, q2, pad]; left padding: the same row shifted by one pad.
    img = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])
    g = metrics.token_groups(mask, img)
    assert g["bos"].nonzero().tolist() == [[0, 0], [1, 1]]
    assert g["image"].sum(1).tolist() == [2, 2]
    assert g["text"][0].nonzero().flatten().tolist() == [1, 4, 5]
    assert g["text"][1].nonzero().flatten().tolist() == [2, 5, 6]
    assert g["query"][0].nonzero().flatten().tolist() == [4, 5]
    assert g["query"][1].nonzero().flatten().tolist() == [5, 6]
    for name in g:  # pads belong to no group
        assert not g[name][0, 6] and not g[name][1, 0]


def test_masked_mean_is_nan_for_an_empty_row():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, False, False]])
    out = metrics.masked_mean(v, m)
    assert out[0] == 2.0 and math.isnan(out[1])


def test_adjacent_cosine_identity_and_orthogonal():
    h = torch.randn(2, 5, 8)
    groups = {"all": torch.ones(2, 5, dtype=torch.bool)}
    assert torch.allclose(metrics.adjacent_cosine(h, h * 3.0, groups)["all"], torch.ones(2))
    a = torch.zeros(1, 2, 4)
    b = torch.zeros(1, 2, 4)
    a[..., 0], b[..., 1] = 1.0, 1.0
    assert metrics.adjacent_cosine(a, b, {"x": torch.ones(1, 2, dtype=torch.bool)})["x"].item() == 0.0


def test_attention_mass_breadth_and_specialist_head():
    # 2 heads, 4 positions: keys 0=BOS, 1-2=image, 3=text query. Head 0 puts all on image, head 1 all on BOS.
    pattern = torch.zeros(1, 2, 4, 4)
    pattern[0, 0, 3, 1:3] = 0.5
    pattern[0, 1, 3, 0] = 1.0
    pattern[0, :, :3, 0] = 1.0  # other queries (not selected) attend to BOS
    query = torch.tensor([[False, False, False, True]])
    keys = {"image": torch.tensor([[False, True, True, False]]), "bos": torch.tensor([[True, False, False, False]])}
    mean, top = metrics.attention_mass(pattern, query, keys)
    assert mean["image"].item() == pytest.approx(0.5) and mean["bos"].item() == pytest.approx(0.5)
    assert top["image"].item() == pytest.approx(1.0) and top["bos"].item() == pytest.approx(1.0)


def test_uniform_mass_counts_visible_keys():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    image = torch.tensor([[0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    query = torch.tensor([[0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    # query 3 sees 4 keys (2 image), query 4 sees 5 keys (2 image)
    assert metrics.uniform_mass(query, image, mask).item() == pytest.approx((2 / 4 + 2 / 5) / 2)


def test_kl_is_zero_for_equal_and_matches_definition():
    torch.manual_seed(0)
    a, b = torch.randn(3, 11), torch.randn(3, 11)
    assert torch.allclose(metrics.kl_from_logits(a, a), torch.zeros(3), atol=1e-6)
    p, q = a.softmax(-1), b.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(metrics.kl_from_logits(a, b), expected, atol=1e-6)
    assert (metrics.kl_from_logits(a, b) > 0).all()
    neg_entropy = (p * p.log()).sum(-1)
    assert torch.allclose(metrics.kl_against_logits(p, neg_entropy, b), expected, atol=1e-6)


def test_segment_mean():
    v = torch.tensor([1.0, 3.0, 10.0])
    out = metrics.segment_mean(v, torch.tensor([0, 0, 2]), 3)
    assert out[0] == 2.0 and math.isnan(out[1]) and out[2] == 10.0


def test_transition_layer():
    assert metrics.transition_layer([10, 9, 8, 4, 2, 0]) == 3  # level 5: first at or below from there on
    assert metrics.transition_layer([10, 4, 7, 2, 1, 0]) == 3  # a rebound above the level moves it later
    assert metrics.transition_layer([2, 10, 9, 4, 1, 0]) == 3  # the drop is measured from the peak
    assert metrics.transition_layer([1, 1, 1, 1]) == 3  # flat: no drop at all
    assert metrics.transition_layer([10, float("nan"), 4, 0]) == 2
    assert metrics.transition_layer([10, 8, 6, 4, 2, 0], fraction=0.9) == 5


def test_plateau_layer():
    assert metrics.plateau_layer([0.9, 0.7, 0.5, 0.3, 0.21, 0.2, 0.2, 0.2]) == 4
    assert metrics.plateau_layer([0.60, 0.601, 0.599, 0.60], floor=0.01) == 0  # flat up to noise
    assert metrics.plateau_layer([0.1, 0.5, 0.5, 0.5]) == 1


def test_lens_sample_splits_between_modalities_and_follows_the_seed():
    # row 0: 10 image + 6 text positions; row 1 is the same sample shifted by 3 pads, with 1 text position
    image = torch.zeros(2, 20, dtype=torch.bool)
    text = torch.zeros(2, 20, dtype=torch.bool)
    image[0, 1:11], text[0, 11:17] = True, True
    image[1, 4:14], text[1, 14] = True, True
    keep = metrics.lens_sample(image, text, 8, [7, 7])
    assert (keep & image).sum(1).tolist() == [4, 7] and (keep & text).sum(1).tolist() == [4, 1]  # text's unused share
    assert not (keep & ~(image | text)).any()
    assert torch.equal(metrics.lens_sample(image, text, 8, [7, 7]), keep)  # the seed alone decides
    assert (keep[0, 1:11] != metrics.lens_sample(image, text, 8, [8, 7])[0, 1:11]).any()
    same = metrics.lens_sample(image[:1].roll(3, 1), text[:1].roll(3, 1), 8, [7])
    assert torch.equal(same[0].roll(-3), keep[0])  # where the row sits (padding) does not move the draw
    assert metrics.lens_sample(image, text, 40, [1, 2]).eq(image | text).all()  # n >= positions: all kept
