"""Product quantization of weight sub-vectors (Jégou et al., TPAMI 2011; for networks, Stock et al., ICLR 2020).

The input dimension of w [in, out] is cut into m = in / d subspaces; in subspace j every output column
contributes one d-dimensional sub-vector w[j·d:(j+1)·d, o], and k-means learns a codebook of 2^bits centroids
per subspace. Stored: codes [m, out] (one byte each) and codebook [m, 2^bits, d]: about bits / d bits per weight.
`ProductQuantized.matmul` never forms W: it scores x's sub-vectors against every centroid ([..., m, 2^bits])
and gathers the scores by code, y[o] = Σ_j T[j, codes[j, o]].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core, registry
from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import serialize
from jaxcompress.quantization._src import common


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class ProductQuantized(core.Compressed):
  """codes: [m, out] uint8; codebook: [m, 2^bits, d] float (the leaf's dtype); shape [m·d, out]."""

  codes: jax.Array
  codebook: jax.Array

  @property
  def shape(self):
    m, _, d = self.codebook.shape
    return (m * d, self.codes.shape[1])

  @property
  def dtype(self):
    return np.dtype(self.codebook.dtype)

  def materialize(self):
    m, _, d = self.codebook.shape
    sub = jnp.take_along_axis(self.codebook, self.codes.astype(jnp.int32)[:, :, None], axis=1)  # [m, out, d]
    return sub.transpose(0, 2, 1).reshape(m * d, -1)

  def matmul(self, x):
    m, _, d = self.codebook.shape
    xs = x.reshape(*x.shape[:-1], m, d)
    table = jnp.einsum('...md,mkd->...mk', xs, self.codebook.astype(x.dtype))  # [..., m, K]
    idx = jnp.broadcast_to(self.codes.astype(jnp.int32), (*x.shape[:-1], *self.codes.shape))
    return jnp.take_along_axis(table, idx, axis=-1).sum(axis=-2)  # [..., out]

  def stored_params(self):
    return int(np.size(self.codes)) + int(np.size(self.codebook))

  def memory_bytes(self):
    return leaf_lib.memory_bytes(self.codes) + leaf_lib.memory_bytes(self.codebook)

  def disk_bytes(self):
    return self.memory_bytes()

  def matmul_flops(self):
    m, k, d = self.codebook.shape
    return 2 * m * k * d + m * self.codes.shape[1]


def _encode(w: ProductQuantized, out: serialize.Writer) -> dict:
  out.put('.codes', w.codes)
  out.put('.codebook', w.codebook)
  return {}


def _decode(desc: dict, src: serialize.Reader) -> ProductQuantized:
  del desc
  return ProductQuantized(jnp.asarray(src.get('.codes')), jnp.asarray(src.get('.codebook')))


serialize.register('product_quantized', ProductQuantized, _encode, _decode)


@functools.partial(jax.jit, static_argnames=('iters',))
def kmeans(v: jax.Array, init: jax.Array, *, iters: int) -> tuple[jax.Array, jax.Array]:
  """Lloyd's k-means. v: [n, d] points, init: [K, d] -> (centroids [K, d], codes [n] int32).

  An empty cluster keeps its centroid.
  """
  def assign(c):
    return jnp.argmin(jnp.sum((v[:, None, :] - c[None]) ** 2, axis=-1), axis=1)

  def step(c, _):
    onehot = jax.nn.one_hot(assign(c), c.shape[0], dtype=v.dtype)
    mass = onehot.sum(0)
    new = (onehot.T @ v) / jnp.where(mass > 0, mass, 1.0)[:, None]
    return jnp.where((mass > 0)[:, None], new, c), None

  c, _ = jax.lax.scan(step, init, None, length=iters)
  return c, assign(c)


def product_quantize(w: jax.Array, key: jax.Array, *, d: int = 4, bits: int = 8, iters: int = 20
                     ) -> ProductQuantized:
  """w: [in, out] -> ProductQuantized with sub-vectors of `d` rows and 2^bits centroids per subspace.

  key: picks each subspace's initial centroids among its sub-vectors (needs out ≥ 2^bits).
  """
  where = 'product_quantize'
  w = jnp.asarray(w)
  common.check_bits(bits, where)
  if w.ndim != 2 or not isinstance(d, int) or d <= 0 or w.shape[0] % d:
    raise ValueError(f'{where}: d={d!r} must be a positive divisor of in={w.shape[0]} (w is [in, out]).')
  if w.shape[1] < 2 ** bits:
    raise ValueError(f'{where}: out={w.shape[1]} columns give fewer sub-vectors than 2^bits={2 ** bits} '
                     'centroids; lower bits.')
  common.check_finite(w, 'w', where)
  m, k = w.shape[0] // d, 2 ** bits
  sub = jnp.asarray(w, jnp.promote_types(w.dtype, jnp.float32)).reshape(m, d, -1).transpose(0, 2, 1)  # [m, out, d]
  picks = jax.vmap(lambda kk: jax.random.choice(kk, w.shape[1], (k,), replace=False))(jax.random.split(key, m))
  init = jnp.take_along_axis(sub, picks[:, :, None], axis=1)
  book, codes = jax.vmap(lambda v, c: kmeans(v, c, iters=iters))(sub, init)
  return ProductQuantized(codes.astype(jnp.uint8), book.astype(w.dtype))


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class PQConfig:
  d: int = 4  # rows per sub-vector
  bits: int = registry.field(8, range='[1, 16]')  # log2 of the centroids per subspace
  iters: int = registry.field(20, range='[1, inf)')  # k-means iterations
  rules: core.Rules = core.Rules()  # which kernels are product-quantized (recipe: include=, exclude=, head=)

  def __post_init__(self):
    if self.rules.embeddings:
      raise ValueError('embeddings=True: a product-quantized leaf is a linear\'s kernel (sub-vectors of its '
                       'input rows), not a lookup table; quantize the embeddings with rtn(include=(), '
                       'embeddings=True).')


def pq(model, params, calib=None, *, config: PQConfig = PQConfig(), key: jax.Array | None = None):
  """Every kernel `config.rules` choose (default: the blocks') as a `ProductQuantized` leaf (`product_quantize`), each from its own split of `key`
  (None: the context's key of 'pq'). calib: a `registry.Context` (for its seed) or a list of batches (not used
  otherwise). Returns (model, params)."""
  key = registry.as_context(calib).key('pq') if key is None else key
  sel = core.select_by(params, model.selection_rules(config.rules))
  if not len(sel):
    raise ValueError(f'pq: include={config.rules.include!r} exclude={config.rules.exclude!r} choose no kernel; '
                     'see model.select(params) for the paths.')
  keys = dict(zip(sel.paths, jax.random.split(key, len(sel.paths))))
  return model, sel.map(lambda p, w: product_quantize(jnp.asarray(w), keys[p], d=config.d, bits=config.bits,
                                                      iters=config.iters), params)


def initial_picks(key: jax.Array, m: int, out: int, bits: int) -> np.ndarray:
  """The column indices `product_quantize` starts each subspace's k-means from: [m, 2^bits]."""
  return np.asarray(jax.vmap(lambda kk: jax.random.choice(kk, out, (2 ** bits,), replace=False))(
      jax.random.split(key, m)))


registry.register('pq', PQConfig, pq, family='quantization', forbids=registry.COMPRESSED, adds='quantized',
                  paper='Jégou et al., "Product Quantization for Nearest Neighbor Search" (TPAMI 2011); Stock et al., '
                  '"And the Bit Goes Down" (ICLR 2020)')
