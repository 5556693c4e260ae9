"""Weight clustering: every weight of a tensor takes one of k = 2^b values, a codebook (the
"palette") learned per tensor; the deployed layer stores b-bit indices and k floats. Unlike a
uniform grid, the codebook can follow the weights' distribution (dense near zero, sparse in
the tails). `bits` is log2 of the codebook size; the codes are the indices 0 … 2^b − 1, so
`signed` plays no part.

k-means — Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding" (ICLR 2016), section 3 (weight sharing):

    min_C Σ_j Σ_{w ∈ c_j} |w − C_j|²            (k-means on the weights' values)
    W̃_i = C_{j(i)},   ∂L/∂C_j = Σ_{i : j(i) = j} ∂L/∂W̃_i        (the shared weights' gradient)

The weights are replaced by their centroids and only the centroids are fine-tuned. The paper
starts the centroids linearly over [min W, max W] (its comparison of starts: a linear start
keeps the rare large weights, which matter most, represented) and keeps the assignments j(i) fixed;
`reassign_every` > 0 re-assigns every weight to its nearest (moved) centroid that often.

DKM — Cho, Alizadeh-Vahid, Adya, Rastegari, "DKM: Differentiable K-Means Clustering Layer for
Neural Network Compression" (ICLR 2022), section 3: k-means as attention, differentiable, so
the weights themselves train with the clustering in the loop:

    A_ij = softmax_j(−d(w_i, C_j) / τ)          (soft assignment; d the Euclidean distance,
                                                 or its square as in coremltools' DKM)
    C_j ← Σ_i A_ij w_i / Σ_i A_ij               (C ← AᵀW / Aᵀ1, repeated until |ΔC| ≤ ε)
    W̃ = A C

in every training forward pass, with the gradient flowing back through all the iterations
(the paper unrolls the loop; memory grows as iterations × N × k, so `max_iterations` bounds
it). The centroids of one step start the next (the paper's warm start: few iterations are
needed once training is under way). τ trades the softness of the assignment (gradient to
weights near a cluster boundary) against the gap between the soft training weight and the
deployed one; here τ is in units of the weight's standard deviation, since the paper's absolute
τ is tuned per network. In eval mode every weight takes its nearest centroid: the deployed
weight has exactly the k codebook values. Both quantizers start from a k-means of the weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.algorithms.quantsim import FakeQuantizer


def nearest_centroid(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the centroid nearest to each value of a 1-D w (centroids in any order)."""
    order = torch.argsort(centroids)
    c = centroids[order].to(w.dtype)
    midpoints = ((c[1:] + c[:-1]) / 2).contiguous()  # the boundaries of the 1-D Voronoi cells
    return order[torch.searchsorted(midpoints, w.contiguous())]


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Arthur & Vassilvitskii's seeding: each new centroid drawn with probability ∝ D(x)²."""
    centroids = [x[torch.randint(len(x), (1,), generator=generator)]]
    d2 = (x - centroids[0]).square()
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:  # inverse-CDF draw (torch.multinomial caps the number of categories)
            u = torch.rand(1, generator=generator, dtype=x.dtype) * total
            index = torch.searchsorted(torch.cumsum(d2, 0), u).clamp(max=len(x) - 1)
        else:  # fewer distinct values than k: any repeat will do
            index = torch.randint(len(x), (1,), generator=generator)
        centroids.append(x[index])
        d2 = torch.minimum(d2, (x - x[index]).square())
    return torch.cat(centroids)


def kmeans_codebook(w: torch.Tensor, k: int, iterations: int = 100, seed: int = 0,
                    init: str | torch.Tensor = "kmeans++") -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the values of w: (centroids sorted ascending, shape (k,), in w's
    dtype; assignments, shape of w, the index of each value's nearest centroid). The start is
    k-means++ (seeded), "linear" over [min, max], or given centroids; it stops when no
    assignment changes or after `iterations` rounds. An empty cluster keeps its centroid."""
    if k < 1 or iterations < 1:
        raise ValueError(f"k and iterations must be positive, got k={k}, iterations={iterations}")
    x = w.detach().reshape(-1).double()
    if x.numel() == 0:
        raise ValueError("k-means of an empty tensor")
    if isinstance(init, torch.Tensor):
        C = init.detach().reshape(-1).double().clone()
        if C.numel() != k:
            raise ValueError(f"init has {C.numel()} centroids, expected {k}")
    elif init == "kmeans++":
        C = _kmeans_plus_plus(x, k, torch.Generator().manual_seed(seed))
    elif init == "linear":
        C = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)
    else:
        raise ValueError(f"init must be 'kmeans++', 'linear' or a tensor of centroids, got {init!r}")
    assignments = nearest_centroid(x, C)
    for _ in range(iterations):
        sums = torch.zeros(k, dtype=x.dtype).index_add_(0, assignments, x)
        counts = torch.bincount(assignments, minlength=k)
        C = torch.where(counts > 0, sums / counts.clamp(min=1), C)
        new = nearest_centroid(x, C)
        if torch.equal(new, assignments):
            break
        assignments = new
    C, _ = torch.sort(C)
    return C.to(w.dtype), nearest_centroid(x, C).reshape(w.shape)


class KMeansOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init: Literal["linear", "kmeans++"] = Field("linear", description="k-means start (the paper's: linear)")
    iterations: int = Field(100, ge=1, le=10_000, description="Lloyd rounds of the initial clustering")
    reassign_every: int = Field(0, ge=0, description="re-assign every this many training steps; 0: frozen")
    seed: int = 0


class KMeansQuantizer(FakeQuantizer):
    """Deep Compression's trained quantization: W̃ = C[j], C learned, j from k-means."""

    trains_like_weights = True  # the centroids are the layer's weights now

    def __init__(self, bits: int, signed: bool | None = None, **options) -> None:
        super().__init__(bits, signed)
        self.options = KMeansOptions(**options)
        self.centroids = nn.Parameter(torch.zeros(2**bits))
        self.register_buffer("assignments", torch.zeros(0, dtype=torch.long))
        self.register_buffer("steps", torch.tensor(0))

    def initialize(self, W: torch.Tensor) -> None:
        o = self.options
        C, j = kmeans_codebook(W, 2**self.bits, o.iterations, o.seed, o.init)
        self.centroids.data.copy_(C)
        self.assignments = j.reshape(-1)

    def quantize(self, W: torch.Tensor) -> torch.Tensor:
        if self.assignments.numel() != W.numel():
            raise ValueError(f"quantizer was clustered on {self.assignments.numel()} weights, got {W.numel()}")
        if self.training and self.options.reassign_every:
            self.steps += 1
            if int(self.steps) % self.options.reassign_every == 0:
                with torch.no_grad():
                    self.assignments = nearest_centroid(W.detach().reshape(-1), self.centroids.detach())
        # Indexing's backward adds up the gradients of the weights sharing a centroid (eq. 3);
        # W itself gets none: it has been replaced by the codebook.
        return self.centroids[self.assignments].reshape(W.shape).to(W.dtype)


def dkm_cluster(w: torch.Tensor, C: torch.Tensor, tau: float, max_iterations: int, tol: float = 0.0,
                distance: str = "euclidean") -> tuple[torch.Tensor, torch.Tensor]:
    """DKM's forward on a 1-D w from centroids C: (W̃ = A C, the last C). Differentiable in w
    (and C) through every iteration; stops early once no centroid moves more than tol."""
    for _ in range(max_iterations):
        diff = w[:, None] - C[None, :]
        D = diff.abs() if distance == "euclidean" else diff.square()
        A = torch.softmax(-D / tau, dim=1)  # (N, k): row i is weight i's soft assignment
        mass = A.sum(0)  # Aᵀ1
        # A cluster with (numerically) no attention keeps its centroid instead of dividing by ~0
        C_new = torch.where(mass > 1e-6, (w @ A) / mass.clamp(min=1e-6), C)  # AᵀW / Aᵀ1
        moved = float((C_new - C).detach().abs().max())
        C = C_new
        if moved <= tol:
            break
    return A @ C, C


class DKMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tau: float = Field(0.05, gt=0, description="temperature τ in units of σ_W (σ_W² for distance='squared')")
    distance: Literal["euclidean", "squared"] = Field("euclidean", description="the paper's |w − c|, or (w − c)²")
    max_iterations: int = Field(10, ge=1, le=1000, description="bound on the unrolled iterations per forward")
    tol: float = Field(1e-4, ge=0, description="converged when no centroid moves more than tol·σ_W")
    init_iterations: int = Field(100, ge=1, le=10_000, description="Lloyd rounds of the initial k-means")
    seed: int = Field(0, description="k-means++ seed of the initial clustering")


class DKMQuantizer(FakeQuantizer):
    """DKM: soft k-means in every training step, hard nearest-centroid weights in eval mode."""

    def __init__(self, bits: int, signed: bool | None = None, **options) -> None:
        super().__init__(bits, signed)
        self.options = DKMOptions(**options)
        self.register_buffer("centroids", torch.zeros(2**bits))  # carried from step to step
        self.register_buffer("sigma", torch.tensor(1.0))  # σ_W at initialization: the unit of τ and tol

    def initialize(self, W: torch.Tensor) -> None:
        o = self.options
        C, _ = kmeans_codebook(W, 2**self.bits, o.init_iterations, o.seed, "kmeans++")
        self.centroids.copy_(C)
        sigma = float(W.float().std()) if W.numel() > 1 else 0.0
        self.sigma.fill_(sigma if sigma > 0 else 1.0)

    @property
    def tau(self) -> float:
        """τ in the distance's own units."""
        unit = float(self.sigma) if self.options.distance == "euclidean" else float(self.sigma) ** 2
        return self.options.tau * unit

    def quantize(self, W: torch.Tensor) -> torch.Tensor:
        w = W.reshape(-1)
        if not self.training:  # deployed: exactly the 2^b codebook values
            return self.centroids[nearest_centroid(w.detach(), self.centroids)].reshape(W.shape).to(W.dtype)
        o = self.options
        W_tilde, C = dkm_cluster(w, self.centroids.clone().to(w.dtype), self.tau, o.max_iterations,
                                 o.tol * float(self.sigma), o.distance)
        with torch.no_grad():
            self.centroids.copy_(C)  # warm start for the next step
        return W_tilde.reshape(W.shape)

    def extra_repr(self) -> str:
        o = self.options
        return super().extra_repr() + f", tau={o.tau}, distance={o.distance}, max_iterations={o.max_iterations}"
