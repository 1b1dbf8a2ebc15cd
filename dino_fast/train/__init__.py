"""dino_fast.train"""
