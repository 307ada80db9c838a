"""Position encodings: hand-computed values, padding behaviour, learned tables."""

import math

import pytest
import torch

from ddetr.models.position_encoding import (PositionEmbeddingLearned, PositionEmbeddingSine,
                                            build_position_encoding)


def test_sine_by_hand():
    # F = 2: both channels of an axis share the frequency 10000 ** 0 = 1.
    pos = PositionEmbeddingSine(num_pos_feats=2)(torch.zeros(1, 2, 3, dtype=torch.bool))
    assert pos.shape == (1, 4, 2, 3)
    for i in range(2):
        for j in range(3):
            y = (i + 1 - 0.5) / 2 * 2 * math.pi  # pixel centre over the valid height
            x = (j + 1 - 0.5) / 3 * 2 * math.pi
            expected = torch.tensor([math.sin(y), math.cos(y), math.sin(x), math.cos(x)])
            torch.testing.assert_close(pos[0, :, i, j], expected, atol=1e-5, rtol=0)


def test_sine_frequencies():
    # F = 4, T = 100: channels (sin, cos) at y / 100 ** 0, then at y / 100 ** (2 / 4).
    pos = PositionEmbeddingSine(num_pos_feats=4, temperature=100)(
        torch.zeros(1, 1, 1, dtype=torch.bool))
    y = 0.5 / 1 * 2 * math.pi
    expected = [math.sin(y), math.cos(y), math.sin(y / 10), math.cos(y / 10)]
    torch.testing.assert_close(pos[0, :4, 0, 0], torch.tensor(expected), atol=1e-5, rtol=0)


def test_detr_sine_has_no_half_pixel_shift():
    # DETR: y / (y_last + eps) * 2pi, so the last valid row and column sit at 2pi
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, :, 2] = True
    pos = PositionEmbeddingSine(num_pos_feats=2, offset=0.0)(mask)
    for i in range(2):
        for j in range(2):
            y = (i + 1) / 2 * 2 * math.pi
            x = (j + 1) / 2 * 2 * math.pi
            expected = torch.tensor([math.sin(y), math.cos(y), math.sin(x), math.cos(x)])
            torch.testing.assert_close(pos[0, :, i, j], expected, atol=1e-5, rtol=0)
    assert build_position_encoding("sine", 64, sine_offset=0.0).offset == 0.0


def test_sine_normalises_by_the_valid_area():
    # The valid part of a padded map is encoded like an unpadded map of its size.
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[0, 3:, :] = True
    mask[0, :, 4:] = True
    encode = PositionEmbeddingSine(num_pos_feats=8)
    padded = encode(mask)[:, :, :3, :4]
    alone = encode(torch.zeros(1, 3, 4, dtype=torch.bool))
    torch.testing.assert_close(padded, alone)


def test_sine_rejects_scale_without_normalize():
    with pytest.raises(ValueError, match="scale"):
        PositionEmbeddingSine(normalize=False, scale=1.0)
    with pytest.raises(ValueError, match="offset"):
        PositionEmbeddingSine(normalize=False, offset=0.0)


def test_learned_reads_row_and_column_tables():
    torch.manual_seed(0)
    encode = PositionEmbeddingLearned(num_pos_feats=3)
    pos = encode(torch.zeros(2, 4, 5, dtype=torch.bool))
    assert pos.shape == (2, 6, 4, 5)
    torch.testing.assert_close(pos[1, :3, 2, 3], encode.col_embed.weight[3])
    torch.testing.assert_close(pos[1, 3:, 2, 3], encode.row_embed.weight[2])


def test_build_names_kind():
    assert isinstance(build_position_encoding("sine", 64), PositionEmbeddingSine)
    with pytest.raises(ValueError, match="position_embedding"):
        build_position_encoding("rope", 64)
