"""Tag a corpus in bulk (``ner bulk``): the inputs cut into shards, each shard read, checked, tagged
by ``ml.pipeline.TextTagger`` (the service's path) and written to its own output file atomically.

``sources``  input files (text, JSONL, Parquet), the shard plan, reading a shard, rejects
``output``   the output folder: job manifest, atomic shard files (Parquet / JSONL), rejects
``job``      one shard from input to output, engine-independent
``local``    the default engine: forked worker processes sharing the loaded model
``ray_engine`` the same job as Ray Data (imported only for ``--engine ray``)
``progress`` a progress bar on a terminal, periodic log lines otherwise

Imports ml and the standard library only; pyarrow, tqdm and ray are imported where used. Never the
service, a web framework or a database library."""
