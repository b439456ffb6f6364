"""The `flywheel` command line: the SDK's verbs, the scripted labelers, and `serve`, `up` and
`learn`, which compose the server and the learner. The top layer: nothing imports it."""
