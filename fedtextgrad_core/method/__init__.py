"""The FedTextGrad method: local TextGrad steps, merging, evaluation, and the checks around uploads."""
