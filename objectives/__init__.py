"""Pretraining objectives (MLM, NSP, SOP, RTD, CLM), one module each; they build on `models`, never read files."""
