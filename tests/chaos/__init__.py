"""The chaos suite: a load of workflows on worker processes killed, disconnected and restarted at random,
then a checker that proves nothing was lost or done twice. ``python -m tests.chaos --help`` runs it long."""
