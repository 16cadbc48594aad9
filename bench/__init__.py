"""rsflow benchmarks: ``python -m bench [--quick] [--only SECTIONS] [--out DIR]`` from the repository root.

Never part of the pass/fail suite: pytest collects ``tests/`` only (``pyproject.toml`` ``testpaths``) and
no file here is named ``test_*.py``. Sections (each a module of this package):

- ``read`` (:mod:`bench.readpath`): the region pipeline with the no-op model against bare rasterio
  windowed reads of the same windows with as many processes as the pipeline had read workers.
- ``batching`` (:mod:`bench.batching`): ``ModelRunner`` against the original one-prompt-at-a-time loop.
- ``memory`` (:mod:`bench.memory`): peak RSS of the driver and of every Ray worker, small vs large scene.
- ``scaling`` (:mod:`bench.scaling`): 1 vs 2 read workers, 1 vs 2 model actors.
- ``gpu`` (:mod:`bench.gpu`): LLaVA-1.5-7B-sized throughput and GPU busy fraction, CUDA only.

Every comparison is a ratio of two figures measured in the same run of the command; the results go to
``bench/results/<YYYY-MM-DD>-<hostname>[-quick].json`` with the machine, the package versions, every
figure and each target with whether it was met. See ``bench/README.md``.
"""
