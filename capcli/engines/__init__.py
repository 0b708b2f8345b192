"""Caption engines: ``local`` (this process) and ``ray`` (a Ray cluster, or a local Ray), over the same inputs
(:mod:`capcli.samples`) and outputs, through one seam to the Captioner (:mod:`.base`). The command side is
:func:`capcli.engines.job.run_caption_job`."""
