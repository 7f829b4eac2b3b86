"""The paper's bottleneck-free analysis (section 4.2; digest section 6): equation (9) and per-link loads.

Notation (the paper's): ``P``, ``D`` prefill and decode *nodes*; ``g`` GPUs (engines) per node, each with one
compute NIC of bandwidth ``B`` per direction; ``s*B`` storage NIC bandwidth per node; ``M`` host memory
bandwidth per node (half duplex: reads and writes add). Every storage NIC is assumed saturated (PE-node SNICs by
PE-path reads, DE-node SNICs by DE-path reads), load balanced, no fabric congestion. Per (PE, DE) engine pair
the PE path carries ``T_p = B*s/(D*g^2)`` and the DE path ``T_c = B*s/(P*g^2)``.

Link loads (bytes/s; the PCIe side of a CNIC is checked, it carries loopback H2D/D2H too):

* PE CNIC read  = 2*T_p*D*g            = 2*B*s/g                (PE steps 3, 5)
* PE CNIC write = (T_p + T_c)*D*g      = (B*s/g)*(1 + D/P)      (PE step 4, DE step 5)  -> P/D >= s/(g-s)
* DE CNIC read  = (T_p + 2*T_c)*P*g    = (B*s/g)*(P/D + 2)      (PE 8, DE 3, 6)         -> P/D <= (g-2s)/s
* DE CNIC write = (2*T_p + T_c)*P*g    = (B*s/g)*(2*P/D + 1)    (PE 7, 9, DE 7)         -> P/D <= (g-s)/(2s)
* DE DRAM       = (3 + 2*P/D)*B*s                                                      -> P/D <= (M/(B*s)-3)/2
* PE DRAM       = 2*B*s                                                                -> 2*B*s <= M

All arithmetic is exact (:class:`fractions.Fraction`); decimal inputs such as ``50`` or ``0.5`` are converted from
their decimal text, so ``g=8, s=1, B=50, M=500`` gives exactly ``[1/7, 7/2]``. The miss tokens' KV, decode-time
persistence and collective traffic are ignored, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from dualpath.errors import ConfigError

Number = int | float | str | Fraction

#: Link name -> (description, the bound it sets). Order = report order.
LINKS: dict[str, str] = {
    "pe_cnic_read": "PE compute NIC, read side (PCIe read: H2D source + KV out)",
    "pe_cnic_write": "PE compute NIC, write side (into PE HBM)",
    "de_cnic_read": "DE compute NIC, read side (DE-path KV out + H2D)",
    "de_cnic_write": "DE compute NIC, write side (KV into DE DRAM + H2D into DE HBM)",
    "de_dram": "DE node host memory (reads + writes)",
    "pe_dram": "PE node host memory (reads + writes)",
}


def frac(x: Number, name: str = "value") -> Fraction:
    """An exact Fraction from an int, a decimal string/float (via its shortest decimal text) or a Fraction."""
    if isinstance(x, Fraction):
        return x
    try:
        return Fraction(str(x)) if isinstance(x, float) else Fraction(x)
    except (ValueError, ZeroDivisionError) as exc:
        raise ConfigError(f"{name}: not a number: {x!r}") from exc


@dataclass(frozen=True)
class Hardware:
    """``g`` engines per node, ``s`` storage NIC bandwidth in units of B, ``B`` CNIC GB/s, ``M`` DRAM GB/s."""

    g: Fraction
    s: Fraction
    B: Fraction
    M: Fraction

    @classmethod
    def of(cls, g: Number = 8, s: Number = 1, B: Number = 50, M: Number = 500) -> Hardware:
        hw = cls(frac(g, "gpus_per_node"), frac(s, "snic_per_node"), frac(B, "cnic_gbps"), frac(M, "dram_gbs"))
        if hw.g <= 0 or hw.s <= 0 or hw.B <= 0 or hw.M <= 0:
            raise ConfigError(f"g, s, B and M must all be > 0, got g={g}, s={s}, B={B}, M={M}")
        return hw


@dataclass(frozen=True)
class PDRange:
    """Equation (9): ``lower <= P/D <= upper``; ``upper_by`` names the link of each upper bound."""

    lower: Fraction
    upper: Fraction
    upper_by: dict[str, Fraction]
    lower_by: str = "pe_cnic_write"
    pe_cnic_read_ok: bool = True
    pe_dram_ok: bool = True

    @property
    def empty(self) -> bool:
        return self.lower > self.upper

    def __str__(self) -> str:
        return f"[{self.lower}, {self.upper}]"


def pd_range(hw: Hardware) -> PDRange:
    """The bottleneck-free P/D range of equation (9)."""
    g, s, B, M = hw.g, hw.s, hw.B, hw.M
    if s >= g:
        raise ConfigError(f"snic_per_node s={s} must be below gpus_per_node g={g} for any P/D to be bottleneck-free")
    uppers = {
        "de_cnic_read": (g - 2 * s) / s,
        "de_cnic_write": (g - s) / (2 * s),
        "de_dram": (M / (B * s) - 3) / 2,
    }
    return PDRange(
        lower=s / (g - s),
        upper=min(uppers.values()),
        upper_by=uppers,
        pe_cnic_read_ok=2 * B * s / g <= B,
        pe_dram_ok=2 * B * s <= M,
    )


@dataclass(frozen=True)
class LinkLoad:
    link: str
    load: Fraction  # GB/s
    capacity: Fraction  # GB/s

    @property
    def utilisation(self) -> Fraction:
        return self.load / self.capacity

    @property
    def saturates(self) -> bool:
        return self.load > self.capacity


def link_loads(P: Number, D: Number, hw: Hardware) -> list[LinkLoad]:
    """Per-link loads (GB/s) for ``P`` prefill and ``D`` decode nodes, in :data:`LINKS` order."""
    p, d = frac(P, "P"), frac(D, "D")
    if p <= 0 or d <= 0:
        raise ConfigError(f"P and D must be > 0, got P={P}, D={D}")
    g, s, B, M = hw.g, hw.s, hw.B, hw.M
    tp = B * s / (d * g * g)
    tc = B * s / (p * g * g)
    loads = {
        "pe_cnic_read": (2 * tp * d * g, B),
        "pe_cnic_write": ((tp + tc) * d * g, B),
        "de_cnic_read": ((tp + 2 * tc) * p * g, B),
        "de_cnic_write": ((2 * tp + tc) * p * g, B),
        "de_dram": ((3 + 2 * p / d) * B * s, M),
        "pe_dram": (2 * B * s, M),
    }
    return [LinkLoad(k, v, c) for k, (v, c) in loads.items()]


def saturated_links(P: Number, D: Number, hw: Hardware) -> list[LinkLoad]:
    """The links a P/D configuration saturates (empty inside the bottleneck-free range)."""
    return [x for x in link_loads(P, D, hw) if x.saturates]


def check_pd(P: Number, D: Number, hw: Hardware) -> list[str]:
    """Warnings (one per saturating link) for a P/D configuration; empty when it is bottleneck-free."""
    out = []
    ratio = frac(P, "P") / frac(D, "D")
    for x in saturated_links(P, D, hw):
        out.append(
            f"P/D = {ratio} is outside the bottleneck-free range {pd_range(hw)}: {x.link} ({LINKS[x.link]}) "
            f"saturates at {float(x.load):.2f} GB/s of {float(x.capacity):.2f} GB/s"
        )
    return out


def parse_pd(text: str) -> tuple[Fraction, Fraction]:
    """``"2/4"``, ``"2P4D"``, ``"0.5"`` -> (P, D)."""
    t = text.strip().upper()
    try:
        if t.endswith("D") and "P" in t:
            p, d = t[:-1].split("P", 1)
            pd = Fraction(p), Fraction(d)
        elif "/" in t:
            p, d = t.split("/", 1)
            pd = Fraction(p), Fraction(d)
        else:
            pd = Fraction(t), Fraction(1)
        ratio = float(pd[0] / pd[1])
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ConfigError(f"--pd: cannot parse {text!r}; use P/D (2/4), 2P4D or a ratio (0.5)") from None
    if not (pd[0] > 0 and pd[1] > 0) or not 0 < ratio < 1e6:
        raise ConfigError(f"--pd: P and D must be > 0 with P/D a ratio below 1e6, got {text!r}")
    return pd
