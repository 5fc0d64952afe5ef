"""The parts of training: :func:`cmsn_cube.train.train` (a loader of batches in, checkpoints out) is built from them.

- :mod:`~cmsn_cube.training.loaders`: the one path from window datasets to batches (hold-out split, new clouds
  and augmentation every epoch, validation loaders), used by ``train_on_stores`` and ``adapt.fit`` alike;
- :mod:`~cmsn_cube.training.schedule`: the learning-rate schedule, a ``torch.optim.lr_scheduler`` scheduler;
- :mod:`~cmsn_cube.training.state`: everything a resumed run needs, in one object saved to ``last.pt``;
- :mod:`~cmsn_cube.training.history`: the loss history, its JSON file and its plot;
- :mod:`~cmsn_cube.training.validation`: validation metrics (the SSIM of :mod:`cmsn_cube.metrics`);
- :mod:`~cmsn_cube.training.loop`: the options, the epochs and steps, and what a run returns.

Importing this package loads none of them (nor torch).
"""
