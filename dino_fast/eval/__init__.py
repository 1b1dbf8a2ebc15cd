"""dino_fast.eval"""
