"""The SimMIM pretraining service: settings, job spec, artifact store and the ``simmim-service`` CLI.

Nothing here imports torch at module level; the API process stays light.
"""
