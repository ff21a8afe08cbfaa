"""What several test modules share (a test module never imports another): tiny harness
configs (`configs`), watching the processes and files of running studies (`runs`), a
study store filled with fabricated results (`fabricated`), and MNIST look-alike files (`mnist`)."""
