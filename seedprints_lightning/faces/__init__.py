"""One face per training loop, each a thin adapter over one base (:mod:`.base`).

``lightning`` (the Lightning ``Trainer``), ``hf`` (the Hugging Face ``Trainer``), ``fabric``
(Lightning Fabric), ``olmo`` (AllenAI's OLMo-core ``Trainer``, the ``[olmo]`` extra), ``torchtitan``
(a torchtitan ``Trainer`` subclass and its ``--module`` config entry, the ``[torchtitan]`` extra) and
``monitor`` (any hand-written loop). A face supplies only its loop's
adapters: which processes there are, how to measure under its strategy, where to log, how to
warn and how to stop; the probe cycle itself is :class:`~seedprints_lightning.core.chain.CustodyChain`.
"""
