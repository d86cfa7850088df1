"""Data, along its way from the source files to the batches a model takes:

1. ``scan``    the recipe's files (CSV, Parquet, globs of shards) as one lazy frame with each
               row's split; files checked as they are opened
2. ``checks``  conditions no row may meet (bad numbers, empty labels), all found in one pass,
               the error naming the first offending row
   ``labels``  the tasks' labels and sample spaces as expressions, with their checks
3. ``fit``     feature choice, vocabularies and numeric statistics from the train rows
4. ``encode``  raw values -> ids and scaled numbers (shared with ``mtl predict``)
5. ``store``   runs 1-4 on polars' streaming engine and writes the encoded splits and
               ``schema.json`` into the cache (``prepare``)
6. ``load``    an encoded split file as contiguous tensors, whole or a window at a time
7. ``source``  batches: in memory, or streamed in shuffled windows read ahead on a thread
   ``batch``   the ``Batch`` every model takes

``schema`` describes what preprocessing learnt; ``synthetic`` generates the MMoE paper's data.
"""
