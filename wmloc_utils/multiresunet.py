"""MultiResUNet built from MONAI blocks: MultiRes blocks in place of conv pairs, residual paths as skips.

Ibtehaz & Rahman (2020), MultiResUNet: Rethinking the U-Net architecture for multimodal biomedical
image segmentation, Neural Networks 121:74-87. Their 3D variant, in MONAI's conv/norm/act blocks.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import ADN, Convolution
from monai.networks.layers import Pool

# The three successive 3x3x3 convolutions of a MultiRes block take these shares of W = alpha * U
# (together they see 3, 5 and 7 voxels wide, a cheap stand-in for parallel 3/5/7 kernels).
_SHARES = (0.167, 0.333, 0.5)


def multires_widths(filters: int, alpha: float) -> list[int]:
    """Widths of the three convolutions of a MultiRes block of ``filters`` (U); their sum is its output."""
    return [max(1, int(alpha * filters * s)) for s in _SHARES]


class MultiResBlock(torch.nn.Module):
    """Three chained 3x3x3 convolutions, concatenated and normalised, plus a 1x1x1 shortcut; then act + norm."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        filters: int,
        alpha: float,
        act: str | tuple,
        norm: str | tuple,
        dropout: float,
    ) -> None:
        super().__init__()
        widths = multires_widths(filters, alpha)
        out = sum(widths)
        self.convs = torch.nn.ModuleList(
            Convolution(spatial_dims, c_in, c_out, kernel_size=3, act=act, norm=norm)
            for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        self.norm = ADN("N", out, norm=norm, norm_dim=spatial_dims)
        self.shortcut = Convolution(spatial_dims, in_channels, out, kernel_size=1, act=None, norm=norm)
        # element-wise dropout (as MONAI's UNet): the top blocks have too few channels to drop whole ones
        self.out = ADN("AND", out, act=act, norm=norm, norm_dim=spatial_dims, dropout=dropout or None, dropout_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts, h = [], x
        for conv in self.convs:
            h = conv(h)
            parts.append(h)
        return self.out(self.norm(torch.cat(parts, 1)) + self.shortcut(x))


class ResPath(torch.nn.Sequential):
    """The skip connection of one level: ``length`` 3x3x3 convolutions, each with a 1x1x1 residual shortcut."""

    def __init__(
        self, spatial_dims: int, in_channels: int, filters: int, length: int, act: str | tuple, norm: str | tuple
    ) -> None:
        super().__init__(
            *(_ResStep(spatial_dims, in_channels if i == 0 else filters, filters, act, norm) for i in range(length))
        )


class _ResStep(torch.nn.Module):
    """One step of a ResPath: act+norm of (3x3x3 conv + 1x1x1 shortcut)."""

    def __init__(self, spatial_dims: int, in_channels: int, filters: int, act: str | tuple, norm: str | tuple) -> None:
        super().__init__()
        self.conv = Convolution(spatial_dims, in_channels, filters, kernel_size=3, act=act, norm=norm)
        self.shortcut = Convolution(spatial_dims, in_channels, filters, kernel_size=1, act=None, norm=norm)
        self.out = ADN("AN", filters, act=act, norm=norm, norm_dim=spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x) + self.shortcut(x))


class MultiResUNet(torch.nn.Module):
    """MultiResUNet (Ibtehaz & Rahman 2020) returning logits; each input edge must be a multiple of 2**depth.

    Level i (0 at the top) has U = ``base_filters`` * 2**i filters, a MultiRes block of W = ``alpha`` * U
    and, for i < ``depth``, a ResPath of length ``depth`` - i to its decoder. The decoder up-samples with
    2x2x2 transposed convolutions, concatenates the ResPath output and applies a MultiRes block; a final
    1x1x1 convolution gives ``out_channels``. The paper's network: ``base_filters=32, depth=4``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        base_filters: int = 32,
        depth: int = 4,
        alpha: float = 1.67,
        act: str | tuple = "relu",
        norm: str | tuple = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.depth = depth
        filters = [base_filters * 2**i for i in range(depth + 1)]
        widths = [sum(multires_widths(u, alpha)) for u in filters]
        self.encoder = torch.nn.ModuleList(
            MultiResBlock(spatial_dims, c_in, u, alpha, act, norm, dropout)
            for c_in, u in zip([in_channels, *widths[:-1]], filters)
        )
        self.pool = Pool[Pool.MAX, spatial_dims](2)
        self.res_paths = torch.nn.ModuleList(
            ResPath(spatial_dims, widths[i], filters[i], depth - i, act, norm) for i in range(depth)
        )
        self.up = torch.nn.ModuleList(
            Convolution(
                spatial_dims,
                widths[i + 1],
                filters[i],
                strides=2,
                kernel_size=2,
                padding=0,
                output_padding=0,
                is_transposed=True,
                conv_only=True,
            )
            for i in range(depth)
        )
        self.decoder = torch.nn.ModuleList(
            MultiResBlock(spatial_dims, 2 * filters[i], filters[i], alpha, act, norm, dropout) for i in range(depth)
        )
        self.head = Convolution(spatial_dims, widths[0], out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            if i < self.depth:
                skips.append(self.res_paths[i](x))
        for i in reversed(range(self.depth)):
            x = self.decoder[i](torch.cat([self.up[i](x), skips[i]], 1))
        return self.head(x)
