"""Evaluation: ASR/WER, speaker similarity, quality and round comparison."""
