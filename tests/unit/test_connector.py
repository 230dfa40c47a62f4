import torch

from omni_attribute.connector import Connector, ConnectorConfig


def test_shapes_pooling_and_padding_invariance():
    torch.manual_seed(0)
    connector = Connector(ConnectorConfig(in_dim=24, out_dim=40, num_tokens=5, width=16, num_layers=2, num_heads=2)).eval()
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
