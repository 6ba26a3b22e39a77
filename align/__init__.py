"""The SpeechAlign loop: configs, data, run directories, stages and the CLI."""
