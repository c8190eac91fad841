import sys; print("driver", sys.argv)
