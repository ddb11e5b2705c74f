"""The site's data: its catalog (``catalog``: site.toml, fingerprints, splits), the dataset formats by name
(``formats``: tables in ``tables``, imaging datasets in ``image_datasets``), image files and their readers
(``images``, ``readers``, ``dicom``), manifests of images (``manifests``), and what a run's task process is handed
of its dataset (``formats.handed``: the run's rows only, made by the agent; ``formats.task_data``: read in the task
process). The bottom layer of ``site_agent``: it imports no other part of it."""
