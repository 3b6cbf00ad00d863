"""The built-in demo, end to end: synthetic worlds with hidden gold labellers (SupportBot in
``world``, CityGuide in ``facts``), the evaluation and report page built on them, and ``run``,
the pipeline that ``rlhf demo`` and ``make demo`` start. It sits above every other layer and
nothing below imports it."""
