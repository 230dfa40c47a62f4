import torch

from omni_attribute.connector import Connector, ConnectorConfig


def test_shapes_pooling_and_padding_invariance():
    torch.manual_seed(0)
    connector = Connector(ConnectorConfig(in_dim=24, out_dim=40, num_tokens=5, width=16, num_layers=2, num_heads=2,
                                          image_positions=False)).eval()
    hidden = torch.randn(2, 7, 24)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    tokens, pooled = connector(hidden, mask)
    assert tokens.shape == (2, 5, 40) and pooled.shape == (2, 40)
    assert torch.allclose(pooled, tokens.mean(1))
    # padded positions must not change row 1: compare with the unpadded row alone
    alone, _ = connector(hidden[1:, :4], torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(tokens[1:], alone, atol=1e-5)
    # and the hidden states matter
    other, _ = connector(hidden[1:, :4] + 1.0, torch.ones(1, 4, dtype=torch.bool))
    assert not torch.allclose(other, alone, atol=1e-3)


def test_paper_default_is_eight_attention_layers_and_one_output_linear():
    config = ConnectorConfig(in_dim=1024, width=1024)
    connector = Connector(config)
    assert len(connector.layers) == 8 and isinstance(connector.input_proj, torch.nn.Identity)
    assert connector.output.out_features == 4096 and config.num_tokens == 16


def test_image_positions_make_the_connector_see_where_image_tokens_sit():
    import pytest

    torch.manual_seed(0)
    config = ConnectorConfig(in_dim=24, out_dim=8, num_tokens=2, width=16, num_layers=1, num_heads=2)
    assert config.image_positions  # on by default, as the trainer writes new adapters
    placed = Connector(config).eval()
    blind = Connector(ConnectorConfig(**{**config.to_dict(), "image_positions": False})).eval()
    blind.load_state_dict(placed.state_dict(), strict=False)  # same weights apart from the place map
    image, instruction = torch.randn(1, 6, 24), torch.randn(1, 3, 24)
    swapped = image[:, [1, 0, 2, 3, 4, 5]]  # two image tokens trade places
    run = lambda net, img: net(torch.cat([img, instruction], dim=1), image_grid=(2, 3))[1]  # noqa: E731
    # without positions, attention is blind to the order of the image tokens; with them it is not
    assert torch.allclose(run(blind, image), run(blind, swapped), atol=1e-5)
    assert not torch.allclose(run(placed, image), run(placed, swapped), atol=1e-4)
    # the same place means the same at every resolution: the features depend on relative coordinates
    from omni_attribute.connector import grid_features

    assert torch.allclose(grid_features(1, 1)[0], grid_features(3, 3)[4], atol=1e-6)
    with pytest.raises(ValueError, match="pass image_grid"):
        placed(image)
    # adapters written before the field existed load without positions
    legacy = {k: v for k, v in config.to_dict().items() if k != "image_positions"}
    assert ConnectorConfig.from_dict(legacy).image_positions is False
    with pytest.raises(ValueError, match="needs read_image"):
        Connector(ConnectorConfig(in_dim=24, image_positions=True, read_image=False))
