"""dino_fast.reference"""
