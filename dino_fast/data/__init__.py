"""dino_fast.data"""
