"""The small models the tests train and differentiate; each test names the sizes it was written for.

``seed`` seeds the global RNG right before the layers are created (None: the caller has seeded it),
so a model is the same whichever test builds it.
"""
import torch
from torch import nn


class TinyText(nn.Module):
    """input_ids -> embedding -> tanh(linear) per token -> mean over the tokens (over those that
    ``attention_mask`` keeps, when given) -> linear."""

    def __init__(self, vocab=20, dim=4, hidden=8, classes=3, dtype=torch.float64, seed=None):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, classes)
        self.to(dtype)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.fc1(self.emb(input_ids)))
        if attention_mask is not None:
            m = attention_mask.to(h.dtype).unsqueeze(-1)
            h = (h * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            h = h.mean(1)
        return self.fc2(h)


def mlp(sizes, act=nn.Tanh, dtype=torch.float32, seed=0):
    """nn.Sequential of Linear layers of the given widths with an activation after each hidden one;
    ``act`` is a module class, or one class per hidden layer. Created in float32, then cast."""
    hidden = len(sizes) - 2
    acts = list(act) if isinstance(act, (list, tuple)) else [act] * hidden
    if len(acts) != hidden:
        raise ValueError(f"{hidden} hidden layers but {len(acts)} activations")
    if seed is not None:
        torch.manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < hidden:
            layers.append(acts[i]())
    return nn.Sequential(*layers).to(dtype)
