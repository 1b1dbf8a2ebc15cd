"""dino_fast.viz"""
