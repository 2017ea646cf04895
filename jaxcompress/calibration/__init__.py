"""Streaming layer-wise calibration: statistics of every linear layer's input, folded in batch by batch.

    stats = calibration.calibrate(model, params, batches, calibration.hessian())
    params, stats = calibration.run_sequential(model, params, batches, observer, compress_block)
    params = calibration.run_blockwise(model, params, batches, fit_block)     # fit each block to its fp outputs

Observers (`hessian`, `column_norms`, `abs_max`, `min_max`, `abs_mean`, `combine`) are optax-like pure functions (init,
update, merge); `Model.block_structure()` says which linears share an input, in call order, and which norm feeds them.
"""

from jaxcompress.calibration.driver import (BlockData, CompressBlock, DensePass, FitBlock, NotSequential, Rows,
                                           SequentialPlan, calibrate, record_sequential, run_blockwise,
                                           run_sequential)
from jaxcompress.calibration.parallel import solve_parallel
from jaxcompress.calibration.selection import block_linears, check_blocks_only, chosen, only
from jaxcompress.calibration.experts import solve_experts
from jaxcompress.calibration.out_of_core import compress_checkpoint, compressed_parts, load_compressed
from jaxcompress.calibration.observers import (Observer, Stats, abs_max, abs_mean, column_norms, combine, hessian,
                                               min_max, norms)

__all__ = [
    'BlockData',
    'CompressBlock',
    'DensePass',
    'FitBlock',
    'NotSequential',
    'Observer',
    'Rows',
    'SequentialPlan',
    'Stats',
    'abs_max',
    'abs_mean',
    'block_linears',
    'check_blocks_only',
    'chosen',
    'calibrate',
    'column_norms',
    'combine',
    'compress_checkpoint',
    'compressed_parts',
    'hessian',
    'load_compressed',
    'min_max',
    'norms',
    'only',
    'record_sequential',
    'run_blockwise',
    'run_sequential',
    'solve_experts',
    'solve_parallel',
]
