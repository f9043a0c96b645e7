"""One rank of tests/test_hes_index.py's multi-rank test, started by torchrun (gloo, CPU).

Like BasicSR's ``train.py`` and ``WBSRModel`` it builds the HES training set and then calls
``load_or_build_index`` again; then it tries a dataset with an unreadable image. It counts, on this rank, the
index builds and the files hashed, and writes them with a digest of the index it got to
``$WBSR_DDP_OUT/rank<r>.json``.
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch

from wbsr_data import patch_index
from wbsr_data.hes_dataset import HESPairedImageDataset


def main() -> None:
    torch.distributed.init_process_group('gloo')
    rank = torch.distributed.get_rank()
    counts = {'builds': 0, 'files_hashed': 0}
    build, digests = patch_index.build_index, patch_index._PairReader.digests

    def counted_build(*args, **kwargs):
        counts['builds'] += 1
        return build(*args, **kwargs)

    def counted_digests(self, i):
        counts['files_hashed'] += 2
        return digests(self, i)

    patch_index.build_index = counted_build
    patch_index._PairReader.digests = counted_digests
    opt = json.loads(os.environ['WBSR_TEST_OPT'])
    dataset = HESPairedImageDataset(opt)  # as basicsr/train.py builds the training set on every rank
    again = patch_index.load_or_build_index(opt)  # as WBSRModel does
    digest = hashlib.sha256()
    for name in patch_index.ARRAYS:
        digest.update(np.ascontiguousarray(getattr(dataset.index, name)).tobytes())
    digest.update(json.dumps([dataset.index.pairs, dataset.index.projection.to_dict()], sort_keys=True).encode())
    record = dict(counts, rank=rank, digest=digest.hexdigest(), candidates=len(dataset.index),
                  second_call_same=bool(np.array_equal(again.scores, dataset.index.scores)
                                        and again.pairs == dataset.index.pairs))
    try:
        HESPairedImageDataset(json.loads(os.environ['WBSR_TEST_BAD_OPT']))
        record['bad'] = None
    except Exception as exc:  # noqa: BLE001  (the test compares what each rank raised)
        record['bad'] = [type(exc).__name__, str(exc)]
    with open(os.path.join(os.environ['WBSR_DDP_OUT'], f'rank{rank}.json'), 'w') as f:
        json.dump(record, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    sys.exit(main())
