"""Flower ServerApp: the prompt strategy over the FedTextGrad core."""
