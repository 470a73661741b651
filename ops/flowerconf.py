"""Flower configuration file used by ``actorq flower`` (``--conf``).

Flower executes this file and takes every global whose name is one of its
options, so only option names live at the top level here.
"""

from ops.flower import format_task  # noqa: F401  (Flower option: the task formatter)

#: The tasks table: the job (actor · id), its state, the job's actorq status and attempt.
tasks_columns = "name,uuid,state,result,received,runtime,worker"
#: The task's "args" shown on the tasks table are only (job id, actor): safe to search.
natural_time = False
