"""Flower ClientApp: local TextGrad optimisation and evaluation over the FedTextGrad core."""
